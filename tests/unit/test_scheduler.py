"""The scheduler's admission: first come, first served, bounded by the batch size and, when set, by the KV pool
that running requests and the prefix cache share on a GPU."""

from __future__ import annotations

from worker.engine.sampling import SamplingParams
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Sequence, Status


def seq(prompt: int, max_tokens: int = 100) -> Sequence:
    return Sequence(list(range(prompt)), SamplingParams(max_tokens=max_tokens), None, lambda e: None)


def test_admission_waits_for_room_in_the_kv_pool():
    s = Scheduler(max_num_seqs=8, max_batch_tokens=512, max_kv_tokens=1000)
    a, b, c = seq(400), seq(400), seq(400)  # 500 tokens reserved each
    for x in (a, b, c):
        s.add(x)
    plan = s.plan()
    assert plan.admitted == [a, b] and c.status is Status.WAITING and s.kv_tokens == 1000
    s.remove(a)
    assert s.plan().admitted == [c] and s.kv_tokens == 1000


def test_first_come_first_served_and_a_lone_request_always_runs():
    s = Scheduler(max_num_seqs=8, max_batch_tokens=512, max_kv_tokens=1000)
    huge, small = seq(5000), seq(10)
    s.add(huge)
    s.add(small)
    assert s.plan().admitted == [huge]  # bigger than the pool, but alone: it runs
    assert s.plan().admitted == []  # the small one waits behind it rather than jumping the queue
    s.remove(huge)
    assert s.plan().admitted == [small] and s.kv_tokens == small.kv_reserve == 110


def test_without_a_kv_bound_the_batch_size_and_the_step_budget_limit_admission():
    s = Scheduler(max_num_seqs=2, max_batch_tokens=512)
    for _ in range(3):
        s.add(seq(100))
    assert len(s.plan().admitted) == 2 and len(s.waiting) == 1


def test_a_waiting_request_is_admitted_only_when_the_step_budget_reaches_it():
    s = Scheduler(max_num_seqs=8, max_batch_tokens=512)
    long, short = seq(1200), seq(10)
    s.add(long)
    s.add(short)
    plan = s.plan()
    # the long prompt takes the whole budget: the short one waits (and looks the cache up later, as vLLM's does)
    assert plan.admitted == [long] and plan.prefill == [(long, 512)] and short.status is Status.WAITING
    long.num_computed = 1024
    plan = s.plan()  # the last chunk leaves budget: the short one is admitted in the same step
    assert plan.admitted == [short] and plan.prefill == [(long, 176), (short, 10)]


def test_generated_tokens_weigh_output_weight_in_the_kv_pool_and_the_step_budget():
    """The sim with token_scale 32: each prompt token stands for 32 real ones, a generated token for one, so an
    answer of up to 64 tokens reserves 2 sim tokens of KV, and 40 decoding requests take 2 of the step budget."""
    s = Scheduler(max_num_seqs=64, max_batch_tokens=256, max_kv_tokens=250, output_weight=1 / 32)
    a, b = seq(100, max_tokens=64), seq(100, max_tokens=64)
    s.add(a)
    s.add(b)
    assert s.plan().admitted == [a, b] and s.kv_tokens == 204  # 164 each at weight 1: b would have waited
    s.remove(a)
    assert s.kv_tokens == 102
    s = Scheduler(max_num_seqs=64, max_batch_tokens=256, output_weight=1 / 32)
    decoding = [seq(6, max_tokens=64) for _ in range(40)]
    for x in decoding:
        s.add(x)
    s.plan()
    for x in decoding:
        x.num_computed = x.num_prefill  # prefilled: each now decodes one token per step
    late = seq(1000)
    s.add(late)
    plan = s.plan()
    assert len(plan.decode) == 40 and plan.prefill == [(late, 254)]
