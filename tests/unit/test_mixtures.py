"""Data mixtures: several training sources drawn by weight and seed, each with its own eval split and
cache key; bad mixture settings refused in one line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml
from torch.utils.data import DistributedSampler

from finetune.assets import gpt2_tokenizer
from finetune.config import ConfigError, DataConfig, load_config, train_sources
from finetune.data import build_data, load_splits, mixture_order


def test_weights_3_to_1_draw_that_ratio_within_5_percent_over_400_samples():
    order = mixture_order([500, 500], [3, 1], seed=7)
    assert len(order) == 1000 and Counter(s for s, _ in order) == {0: 750, 1: 250}  # places apportioned exactly
    # what training sees: the first 400 samples the two ranks' seeded samplers draw from the mixture
    drawn = [order[i] for rank in (0, 1) for i in list(DistributedSampler(order, num_replicas=2, rank=rank, shuffle=True, seed=7))[:200]]
    share = Counter(s for s, _ in drawn)[0] / len(drawn)
    assert abs(share - 0.75) <= 0.05, f"source 0 drew {share:.3f} of 400 samples"
    assert mixture_order([500, 500], [3, 1], seed=7) == order and mixture_order([500, 500], [3, 1], seed=8) != order


def test_a_small_source_repeats_and_a_large_one_is_subsampled():
    order = mixture_order([10, 90], [1, 1], seed=0)  # 100 places: 50 each
    counts = Counter(order)
    assert all(counts[(0, k)] == 5 for k in range(10))  # every small-source sample five times
    large = [k for s, k in order if s == 1]
    assert len(large) == 50 == len(set(large))  # 50 distinct of the 90


def write_rows(path: Path, prefix: str, n: int) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"{prefix} question {i}?", "input": "", "output": f"{prefix} answer {i}."}) + "\n" for i in range(n)))
    return path


def test_each_source_holds_out_its_own_eval_split_and_the_cache_key_covers_the_mixture(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE", str(tmp_path / "cache"))
    a, b = write_rows(tmp_path / "a.jsonl", "alpha", 40), write_rows(tmp_path / "b.jsonl", "beta", 20)
    yaml_file = tmp_path / "mix.yaml"
    yaml_file.write_text(yaml.safe_dump({"data": {"train_path": [{"path": str(a), "weight": 3}, {"path": str(b), "weight": 1, "name": "small"}], "eval_fraction": 0.25}}))
    cfg = load_config(["--config", str(yaml_file)], world_size=1)
    assert [(s.name, s.weight) for s in train_sources(cfg.data)] == [("a", 3.0), ("small", 1.0)]
    splits = load_splits(cfg.data, seed=0)
    assert Counter(r["_source"] for r in splits.eval) == {0: 10, 1: 5}
    data = build_data(cfg.data, gpt2_tokenizer(), splits)
    assert sorted(data.eval_by_source) == ["a", "small"] and [len(v) for v in data.eval_by_source.values()] == [10, 5]
    assert len(data.train) == 45 and [s["drawn"] for s in data.sources] == [34, 11]  # 45 * 3/4 = 33.75 -> 34
    again = build_data(cfg.data, gpt2_tokenizer(), splits)
    assert again.cache.startswith("hit ") and again.train == data.train
    reweighted = DataConfig(train_path=[str(a), str(b)], weights=[1, 1], eval_fraction=0.25)
    other = build_data(reweighted, gpt2_tokenizer(), load_splits(reweighted, seed=0))
    assert other.cache.startswith("built ") and [s["drawn"] for s in other.sources] == [23, 22]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["data.train_path=[A,B]", "data.weights=[3]"], "data.weights: 1 weight(s) for 2 data.train_path source(s); give one weight per source"),
        (["data.train_path=[A,B]", "data.weights=[3,0]"], "data.weights: the weight of B is 0; weights must be positive"),
        (["data.train_path=[A,B]", "data.weights=[3,-1]"], "weights must be positive"),
        (["data.train_path=[A,MISSING]"], "data.train_path: file not found: MISSING"),
        (["data.train_path=[A,A]"], "two sources are named 'a'"),
        (["data.train_path=[A,B]", "data.eval_path=B"], "data.eval_path: one eval file cannot be split among the mixture's sources"),
        (["data.train_path=[A,B]", "data.weights=[3,x]"], "data.weights: expected a number, got 'x'"),
        (["data.train_path=[A,{path: B, size: 3}]"], "each mapping needs a path and may have weight, name"),
    ],
)
def test_bad_mixtures_are_refused_in_one_line(tmp_path, argv, message):
    paths = {"A": str(write_rows(tmp_path / "a.jsonl", "a", 8)), "B": str(write_rows(tmp_path / "b.jsonl", "b", 8)), "MISSING": str(tmp_path / "missing.jsonl")}
    argv = [arg.replace("A", paths["A"]).replace("MISSING", paths["MISSING"]).replace("B", paths["B"]) if arg.startswith("data.") and "weights" not in arg else arg for arg in argv]
    message = message.replace("MISSING", paths["MISSING"]).replace("of B", f"of {paths['B']}")
    with pytest.raises(ConfigError) as err:
        load_config(argv, world_size=1)
    assert message in str(err.value) and "\n" not in str(err.value)
