"""Short run of the parser fuzzer (bench/fuzz.py): each outside-input parser raises only its documented error.

The full run (100,000 cases per parser) is ``.venv/bin/python bench/fuzz.py``; this one feeds 2,000
mutated inputs per parser with a fixed seed so CI stays fast.
"""

from __future__ import annotations

import importlib.util
import json
import random
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parent.parent
CASES = 2_000
SEED = 20240601


def _load_fuzz() -> ModuleType:
    spec = importlib.util.spec_from_file_location("qgate_bench_fuzz", REPO / "bench" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()
TARGETS = {target.name: target for target in fuzz.build_targets()}


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_parser_raises_only_its_documented_error_on_mutated_input(name: str) -> None:
    result = fuzz.run_target(TARGETS[name], CASES, SEED)
    lines: list[str] = []
    fuzz.report(result, SEED, lines.append)
    assert result.cases == CASES
    assert result.undocumented == 0, "\n".join(lines)


MIXED = [
    "messages.InitHello.parse",
    "messages.Kick.parse",
    "guard.parse_retry_head",
    "guard.open_retry",
    "guard.mac1_ok",
    "guard.mac2_ok",
    "etsi014.parse_enc_keys",
    "policy.parse_policy",
]


@pytest.mark.parametrize("name", MIXED)
def test_fuzzer_exercises_both_acceptance_and_rejection(name: str) -> None:
    result = fuzz.run_target(TARGETS[name], 300, SEED)
    assert result.accepted > 0
    assert result.documented_errors + result.undocumented > 0


@pytest.mark.parametrize("role", ["master", "slave"])
def test_engine_fuzzing_gets_past_mac1_and_mac2_to_the_state_machine(role: str) -> None:
    """Inputs with the right mac keys reach reassembly, parsing, challenge checks, signatures, Retries."""
    target = {t.name: t for t in fuzz.build_targets()}[f"peer.{role}.receive_fragment"]  # a fresh engine
    assert target.coverage is not None
    result = fuzz.run_target(target, CASES, SEED)
    assert result.undocumented == 0
    stats = target.coverage()
    for counter in ("drops_mac1", "drops_mac2", "malformed_messages", "auth_failures", "stale_challenges",
                    "retries_sent", "retries_received", "retries_unmatched"):  # fmt: skip
        assert stats[counter] > 0, (counter, stats)


def test_fuzzer_generates_the_same_inputs_for_the_same_seed() -> None:
    first, second = fuzz.build_targets(), fuzz.build_targets()
    for a, b in zip(first, second, strict=True):
        rng_a, rng_b = random.Random(f"7:{a.name}"), random.Random(f"7:{b.name}")
        assert [a.generate(rng_a) for _ in range(50)] == [b.generate(rng_b) for _ in range(50)]


def test_fuzzer_prints_one_json_summary_line_last_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    status = fuzz.main(["--cases", "50", "--seed", "3", "--only", "wire.", "--json"])
    out = capsys.readouterr()
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert status == 0 and summary["ok"] is True
    assert set(summary["parsers"]) == {"wire.parse_data_header", "wire.parse_fragment",
                                       "wire.classify_datagram", "wire.Reassembler"}  # fmt: skip
    assert summary["parsers"]["wire.parse_fragment"] == {
        key: summary["parsers"]["wire.parse_fragment"][key]
        for key in ("cases", "documented_errors", "accepted", "undocumented")
    }
    assert summary["parsers"]["wire.parse_fragment"]["cases"] == 50
    assert "cases/s" in out.err


def test_fuzzer_counts_an_undocumented_exception_and_fails() -> None:
    def broken(data: bytes) -> object:
        if data[:1] == b"\x01":
            raise IndexError("simulated parser bug")
        return None

    target = fuzz.Target("broken", (ValueError,), TARGETS["wire.parse_fragment"].generate, broken)
    result = fuzz.run_target(target, 200, SEED)
    assert result.undocumented > 0
    assert any(key.startswith("IndexError at") for key in result.failures)
