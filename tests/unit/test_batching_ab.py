"""The batching A/B's pure helpers (bench/batching_ab.py): output comparison, table row, verdicts."""

from __future__ import annotations

from bench.batching_ab import OFF, ON, ab_row, same_outputs, verdicts
from bench.load_results import CPU_SETS, OTHERS, LoadResult, SessionResult


def load(texts: list[str | None], wall_s: float = 1.0, tokens: int = 4) -> LoadResult:
    """One run whose sessions produced ``texts`` (None: an error), ``tokens`` tokens each, 10 ms apart."""
    sessions = [
        SessionResult(0.0, [0.01 * (i + 1) for i in range(tokens)], text or "", None if text is not None else "boom")
        for text in texts
    ]
    return LoadResult(sessions, wall_s, dict.fromkeys((*CPU_SETS, OTHERS), 0.5))


def test_outputs_compare_by_prompt_and_skip_errors():
    off = [load(["a", "b", None]), load(["a", "b", "c"])]
    on = [load(["a", "x", "c"]), load([None, "b", "c"])]
    assert same_outputs(off, on) == (4, 5)


def test_a_row_sets_on_against_off_stock_and_in_process():
    runs = {
        OFF: {("raw", 4): [load(["a"] * 4, wall_s=2.0)], ("gateway stream", 4): [load(["a"] * 4, wall_s=2.0)]},
        ON: {("raw", 4): [load(["a"] * 4, wall_s=1.0)], ("gateway stream", 4): [load(["a", "a", "a", "z"])]},
    }
    row = ab_row(4, "gateway stream", runs, in_process=20.0)
    assert row[:8] == ("4", "gateway stream", "8.0", "16.0", "2.00", "2.00", "20.0", "0.80")
    assert row[-2:] == ("0", "3/4")


def test_one_batching_value_reads_dashes_and_gives_no_verdicts():
    runs = {ON: {("raw", 1): [load(["a"])]}}
    assert ab_row(1, "raw", runs, in_process=None)[2:8] == ("-", "4.0", "-", "-", "-", "-")
    assert verdicts(runs, [1], ["raw"], {}) == ["  batching off and on were not both run: no verdicts"]


def test_verdicts_check_rate_outputs_in_process_and_one_session():
    def runs_at(count: int, on_wall_s: float, on_text: str) -> dict:
        return {
            OFF: {("gateway stream", count): [load(["a"] * count, wall_s=2.0)]},
            ON: {("gateway stream", count): [load([on_text] * count, wall_s=on_wall_s)]},
        }

    fast = verdicts(runs_at(16, 0.5, "a"), [16], ["gateway stream"], {16: 150.0})
    assert "MET" in fast[0] and "NOT MET" not in fast[0] and "0.85x the in-process limit" in fast[1]
    assert "NOT MET" in verdicts(runs_at(16, 0.5, "b"), [16], ["gateway stream"], {})[0]  # outputs differ
    alone = verdicts(runs_at(1, 2.1, "a"), [1], ["gateway stream"], {})
    assert alone == ["  N=1 gateway stream: time per token on/off 1.050x (limit 1.05x): MET"]
