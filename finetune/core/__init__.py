"""The bottom layer: records and declarations with no torch or ColossalAI import; imports nothing above it."""
