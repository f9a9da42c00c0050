"""The version guard every fix module holds: a fix reads an upstream library's code line by line, so it is
tied to the one version it was written for."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version as installed_version

from finetune.errors import FinetuneError


class UnsupportedVersion(FinetuneError):
    """An upstream library is not the version its fixes were written for."""


@dataclass(frozen=True)
class VersionGuard:
    """The one version of `library` its fix module was written for."""

    library: str  # the distribution name (pip's)
    supported: str

    def found(self, version: str | None = None) -> str:
        """`version`, or the installed one, without a local build tag (torch's `+cpu`)."""
        return (version or installed_version(self.library)).split("+")[0]

    def matches(self, version: str | None = None) -> bool:
        """Whether `version` (default: the installed one) is the supported one."""
        return self.found(version) == self.supported

    def require(self, what: str, version: str | None = None) -> None:
        """Refuse (UnsupportedVersion) to apply `what` to any other version: its line-level assumptions would be unchecked."""
        if not self.matches(version):
            raise UnsupportedVersion(
                f"{what} for {self.library} {self.supported}, found {self.found(version)}: "
                f"install the pinned stack (pip install -r requirements.txt -c constraints.txt)"
            )
