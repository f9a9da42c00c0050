"""The preference objectives of `preference.loss`: one Objective record each (formulas and papers: docs/preference.md).

An objective maps a batch of pairs' log-probabilities to a loss and a reward per pair. It sees
  chosen, rejected: the policy's log-probability of each reply: summed over its tokens, or their mean
      where `length_normalized` (SimPO, ORPO);
  ref_chosen, ref_rejected: the same summed log-probabilities under the reference model (None where
      `reference` is False);
  settings: the `preference` config section (beta, label_smoothing, simpo_gamma, orpo_lambda).
BRADLEY_TERRY, task=reward's objective, sees a scalar head's score of each sequence instead of log-probabilities.
The records are torch-free (config validation reads them): the formulas use tensor methods only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


def log_sigmoid(x):
    """log(sigmoid(x)) of a tensor, stable for large |x|: min(x, 0) - log(1 + exp(-|x|)), with min(x, 0) written as
    (x - |x|) / 2 so that the kinks of min and |x| at 0 cancel: the gradient there is sigmoid(0) = 1/2, as it must be
    (a first DPO step under LoRA has every margin exactly 0; clamp's gradient at its bound would double it)."""
    return (x - x.abs()) / 2 - (-x.abs()).exp().log1p()


def log_odds(mean_logp):
    """log(p / (1 - p)) of a reply's mean token probability p = exp(mean_logp) (ORPO's odds)."""
    return mean_logp - (-mean_logp.exp()).log1p()


@dataclass(frozen=True)
class Objective:
    """One preference objective: what it reads, and its loss and rewards per pair."""

    name: str
    paper: str
    reference: bool  # needs the reference model's log-probabilities
    length_normalized: bool  # reads each reply's mean token log-probability instead of the sum
    settings: tuple[str, ...]  # the `preference` settings it reads besides beta (config validation refuses the others)
    # (chosen, rejected, ref_chosen, ref_rejected, settings) -> (loss, chosen reward, rejected reward), each [pairs]
    formula: Callable[..., tuple[Any, Any, Any]]


def _log_ratio_rewards(chosen, rejected, ref_chosen, ref_rejected, settings):
    """beta * log(pi / pi_ref) of each reply: the implicit rewards of DPO and its relatives."""
    return settings.beta * (chosen - ref_chosen), settings.beta * (rejected - ref_rejected)


def _dpo(chosen, rejected, ref_chosen, ref_rejected, settings):
    good, bad = _log_ratio_rewards(chosen, rejected, ref_chosen, ref_rejected, settings)
    margin, smoothing = good - bad, settings.label_smoothing  # conservative DPO: the labels flipped with probability `smoothing`
    return -(1 - smoothing) * log_sigmoid(margin) - smoothing * log_sigmoid(-margin), good, bad


def _ipo(chosen, rejected, ref_chosen, ref_rejected, settings):
    good, bad = _log_ratio_rewards(chosen, rejected, ref_chosen, ref_rejected, settings)
    ratio = (chosen - ref_chosen) - (rejected - ref_rejected)
    return (ratio - 1 / (2 * settings.beta)) ** 2, good, bad


def _hinge(chosen, rejected, ref_chosen, ref_rejected, settings):
    good, bad = _log_ratio_rewards(chosen, rejected, ref_chosen, ref_rejected, settings)
    return (1 - (good - bad)).relu(), good, bad


def _simpo(chosen, rejected, ref_chosen, ref_rejected, settings):
    good, bad = settings.beta * chosen, settings.beta * rejected
    return -log_sigmoid(good - bad - settings.simpo_gamma), good, bad


def _orpo(chosen, rejected, ref_chosen, ref_rejected, settings):
    # The SFT term is the chosen reply's mean token negative log-likelihood; rewards as TRL reports them.
    loss = -chosen - settings.orpo_lambda * log_sigmoid(log_odds(chosen) - log_odds(rejected))
    return loss, settings.beta * chosen, settings.beta * rejected


def _bradley_terry(chosen, rejected, ref_chosen, ref_rejected, settings):
    # chosen, rejected: a reward model's scalar scores; the rewards are the scores themselves.
    return -log_sigmoid(chosen - rejected), chosen, rejected


# task=reward's objective over a scalar head's scores; not a `preference.loss` choice (those score log-probabilities).
BRADLEY_TERRY = Objective("bradley_terry", "Bradley and Terry 1952; as a reward model's loss, Ouyang et al. 2022, Training language models to follow instructions with human feedback (arXiv:2203.02155)", False, False, (), _bradley_terry)

OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("dpo", "Rafailov et al. 2023, Direct Preference Optimization (arXiv:2305.18290)", True, False, ("label_smoothing",), _dpo),
        Objective("ipo", "Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences (arXiv:2310.12036)", True, False, (), _ipo),
        Objective("hinge", "Zhao et al. 2023, SLiC-HF: Sequence Likelihood Calibration with Human Feedback (arXiv:2305.10425)", True, False, (), _hinge),
        Objective("simpo", "Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward (arXiv:2405.14734)", False, True, ("simpo_gamma",), _simpo),
        Objective("orpo", "Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model (arXiv:2403.07691)", False, True, ("orpo_lambda",), _orpo),
    )
}
