"""The step planner's rules as tables: pure functions, no worker thread, no backend, no clock."""

from __future__ import annotations

import dataclasses

import pytest

from erllama.model.batching import BatchingConfig
from erllama.model.events import Phase
from erllama.model.planner import PrefillCost, close_grace_s, gather_has_room, gather_wait_s, plan_step

RULES = BatchingConfig(batch_wait_s=0.005, gather_share=0.01, min_cut_chunk=64, close_grace_s=0.02)


@dataclasses.dataclass(frozen=True)
class Seq:
    """A running sequence as the planner sees it: ``n`` context tokens (ids 1000 + position), ``fed`` of them in
    the KV cache."""

    seq_id: int
    n_prompt: int
    fed: int
    n: int = 0  # context length; defaults to the prompt's
    fold: bool = False
    ended: bool = False
    cold_point: int | None = None
    restored: int = 0

    @property
    def tokens(self) -> list[int]:
        return [1000 + i for i in range(max(self.n, self.n_prompt))]


def gen(seq_id: int, **kw: object) -> Seq:
    """A generating sequence: prompt of 10 fed, one sampled token pending."""
    return Seq(seq_id, 10, 10, n=11, **kw)  # type: ignore[arg-type]


def closing(seq_id: int) -> Seq:
    return gen(seq_id, ended=True)


def prompt(seq_id: int, n_prompt: int, fed: int = 0, **kw: object) -> Seq:
    return Seq(seq_id, n_prompt, fed, **kw)  # type: ignore[arg-type]


def shape(seqs: list[Seq], n_batch: int = 512, free: bool = True) -> list[tuple[int, int, int, bool]]:
    """(seq_id, first position, tokens, logits) of each item of the planned step."""
    plan = plan_step(seqs, n_batch=n_batch, free_seqs=free, rules=RULES)
    assert [o.seq_id for o in plan.owners] == [i.seq_id for i in plan.items]
    assert plan.n_tokens == sum(len(i.tokens) for i in plan.items) <= n_batch
    return [(i.seq_id, i.tokens[0] - 1000, len(i.tokens), i.logits) for i in plan.items]


@pytest.mark.parametrize(
    ("rule", "seqs", "n_batch", "free", "expected"),
    [
        # 1. generating first: every pending token, then prefill with what the budget leaves
        (
            "generating first",
            [prompt(0, 300), gen(1), gen(2)],
            512,
            True,
            [(1, 10, 1, True), (2, 10, 1, True), (0, 0, 299, False)],
        ),
        ("generating first, budget", [gen(0), gen(1), prompt(2, 300)], 2, True, [(0, 10, 1, True), (1, 10, 1, True)]),
        # 2. closing rides along with generating rows, no logits row
        ("closing rides along", [closing(0), gen(1)], 512, True, [(0, 10, 1, False), (1, 10, 1, True)]),
        ("closing waits out a prefill-only step", [closing(0), prompt(1, 100)], 512, True, [(1, 0, 99, False)]),
        (
            "closing goes when no sequence is free",
            [closing(0), prompt(1, 100)],
            512,
            False,
            [(0, 10, 1, False), (1, 0, 99, False)],
        ),
        ("closing alone closes", [closing(0)], 512, True, [(0, 10, 1, False)]),
        # 3. prefill in arrival order, a long prompt spread over steps
        ("arrival order", [prompt(3, 100), prompt(1, 100)], 512, True, [(3, 0, 99, False), (1, 0, 99, False)]),
        ("a long prompt is cut by the budget", [prompt(0, 2000)], 512, True, [(0, 0, 512, False)]),
        ("its next chunk", [prompt(0, 2000, fed=512)], 512, True, [(0, 512, 512, False)]),
        # 4. the last prompt token in a step of its own ... unless the backend folds it into the final chunk
        ("last prompt token alone", [prompt(0, 100, fed=99)], 512, True, [(0, 99, 1, True)]),
        ("a restored prompt's last token", [prompt(0, 100, fed=99, restored=99)], 512, True, [(0, 99, 1, True)]),
        ("folded into the final chunk", [prompt(0, 100, fold=True)], 512, True, [(0, 0, 100, True)]),
        # 5. a chunk ends at the cold save point
        ("cold save point", [prompt(0, 300, cold_point=128)], 512, True, [(0, 0, 128, False)]),
        ("past the cold save point", [prompt(0, 300, fed=128, cold_point=None)], 512, True, [(0, 128, 171, False)]),
        (
            "a save point at the prompt's end is no cut",
            [prompt(0, 100, fold=True, cold_point=100)],
            512,
            True,
            [(0, 0, 100, True)],
        ),
        # 6. a scrap the budget leaves waits when other prompts are in the step; the first chunk never waits
        ("minimum cut chunk", [prompt(0, 480), prompt(1, 300)], 512, True, [(0, 0, 479, False)]),
        (
            "a chunk that fits is no scrap",
            [prompt(0, 480), prompt(1, 20)],
            512,
            True,
            [(0, 0, 479, False), (1, 0, 19, False)],
        ),
        (
            "a cut of min_cut_chunk goes",
            [prompt(0, 449), prompt(1, 300)],
            512,
            True,
            [(0, 0, 448, False), (1, 0, 64, False)],
        ),
        ("the first chunk is never a scrap", [gen(0), prompt(1, 300)], 8, True, [(0, 10, 1, True), (1, 0, 7, False)]),
    ],
)
def test_plan_step_rules(
    rule: str, seqs: list[Seq], n_batch: int, free: bool, expected: list[tuple[int, int, int, bool]]
) -> None:
    assert shape(seqs, n_batch, free) == expected, rule


def test_phase_and_what_closes() -> None:
    plan = plan_step([closing(0), gen(1), prompt(2, 50)], n_batch=512, free_seqs=True, rules=RULES)
    assert plan.phase is Phase.PREFILLING
    assert [s.seq_id for s in plan.closing] == [0]
    plan = plan_step([gen(0), gen(1)], n_batch=512, free_seqs=True, rules=RULES)
    assert plan.phase is Phase.GENERATING
    assert plan.closing == ()
    waiting = plan_step([closing(0), prompt(1, 50)], n_batch=512, free_seqs=True, rules=RULES)
    assert waiting.closing == (), "a closing that waits out the step is not closed by it"


@pytest.mark.parametrize(
    ("case", "seqs", "free", "s_per_token", "rules", "expected"),
    [
        ("a fresh prompt waits 1% of its step", [prompt(0, 100)], True, 0.001, RULES, 0.001),
        ("capped at batch_wait_s", [prompt(0, 400)], True, 0.01, RULES, 0.005),
        ("no estimate yet", [prompt(0, 100)], True, None, RULES, 0.0),
        ("off", [prompt(0, 100)], True, 0.001, dataclasses.replace(RULES, batch_wait_s=0), 0.0),
        ("no free sequence", [prompt(0, 100)], False, 0.001, RULES, 0.0),
        ("a stream is generating", [prompt(0, 100), gen(1)], True, 0.001, RULES, 0.0),
        ("prefill already under way", [prompt(0, 100, fed=50)], True, 0.001, RULES, 0.0),
        ("restored, not fed yet: still waits", [prompt(0, 100, fed=50, restored=50)], True, 0.001, RULES, 0.0005),
        ("no room for another chunk", [prompt(0, 460)], True, 0.001, RULES, 0.0),
    ],
)
def test_gather_wait(  # noqa: PLR0917 - one parameter per column of the table
    case: str, seqs: list[Seq], free: bool, s_per_token: float | None, rules: BatchingConfig, expected: float
) -> None:
    got = gather_wait_s(seqs, n_batch=512, free_seqs=free, s_per_token=s_per_token, rules=rules)
    assert got == pytest.approx(expected), case


def test_gather_room_counts_the_prompts_left() -> None:
    assert gather_has_room([prompt(0, 448)], n_batch=512, rules=RULES)
    assert not gather_has_room([prompt(0, 449)], n_batch=512, rules=RULES)
    assert gather_has_room([prompt(0, 600, fed=200), gen(1)], n_batch=512, rules=RULES), (
        "fed tokens and replies do not count"
    )


@pytest.mark.parametrize(
    ("case", "seqs", "t_closing", "now", "expected"),
    [
        ("only closings: wait out the grace", [closing(0), closing(1)], [10.0, 10.01], 10.005, 0.015),
        ("the grace is over", [closing(0)], [10.0], 10.03, 0.0),
        ("a live sequence: no wait", [closing(0), gen(1)], [10.0, 0.0], 10.0, 0.0),
        ("nothing running", [], [], 10.0, 0.0),
    ],
)
def test_close_grace(case: str, seqs: list[Seq], t_closing: list[float], now: float, expected: float) -> None:
    assert close_grace_s(seqs, t_closing, now, RULES) == pytest.approx(expected), case


def test_prefill_cost_is_seeded_by_small_steps_and_averaged_over_prefill_sized_ones() -> None:
    cost = PrefillCost(RULES)
    assert cost.s_per_token is None
    cost.record(8, 0.08)  # a generating step: 10 ms a token, an overestimate
    assert cost.s_per_token == pytest.approx(0.01)
    cost.record(8, 0.8)  # small steps only seed it
    assert cost.s_per_token == pytest.approx(0.01)
    cost.record(100, 0.1)
    assert cost.s_per_token == pytest.approx(0.0055)
    cost.record(200, 0.1)
    assert cost.s_per_token == pytest.approx(0.0030)
