"""Scheduler policy step by step, with a real KV cache manager and no model: token budget,
FCFS, chunked prefill, max_num_seqs, preemption, abort and prefix-cache hits."""

import weakref

from pagedserve.engine.kv_cache import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput

BLOCK_SIZE = 4
FIRST_FAKE_TOKEN = 1000


def make_request(request_id: str, num_prompt_tokens: int, max_tokens: int = 20,
                 first_token: int = 0) -> Request:
    tokens = list(range(first_token, first_token + num_prompt_tokens))
    return Request(request_id, tokens, SamplingParams(temperature=0, ignore_eos=True), max_tokens)


def make_scheduler(num_blocks: int = 64, max_num_seqs: int = 8, max_num_batched_tokens: int = 100,
                   enable_caching: bool = False) -> Scheduler:
    kvm = KVCacheManager(num_blocks, BLOCK_SIZE, enable_caching)
    return Scheduler(kvm, max_num_seqs, max_num_batched_tokens, max_model_len=512)


def fake_token(request: Request) -> int:
    # Distinct per output position, so a lost or repeated sample shows in output_token_ids.
    return FIRST_FAKE_TOKEN + request.num_output_tokens


def step(sched: Scheduler) -> SchedulerOutput:
    """What the engine does around the model: schedule, sample, stop at max_tokens.
    It also replays each output's diffs as the runner would and checks that the block tables
    they give are the KV cache manager's."""
    out = sched.schedule()
    assert out.total_num_scheduled_tokens <= sched.max_num_batched_tokens
    assert len(out.num_scheduled_tokens) <= sched.max_num_seqs
    assert all(n > 0 for n in out.num_scheduled_tokens.values())
    check_diffs(sched, out)
    finished = []
    for request_id in out.num_scheduled_tokens:
        request = sched.requests[request_id]
        assert request.num_computed_tokens <= request.num_tokens
        if request.num_computed_tokens == request.num_tokens:
            request.append_token(fake_token(request))
            if request.num_output_tokens >= request.max_tokens:
                finished.append(request)
    sched.finish_requests(finished, RequestStatus.FINISHED_LENGTH)
    return out


# scheduler -> the runner's view. Weak keys: an id() could be reused by a later scheduler.
_RUNNER_TABLES: weakref.WeakKeyDictionary[Scheduler, dict[str, list[int]]] = (
    weakref.WeakKeyDictionary())


def check_diffs(sched: Scheduler, out: SchedulerOutput) -> None:
    tables = _RUNNER_TABLES.setdefault(sched, {})
    for request_id in out.finished_request_ids + out.preempted_request_ids:
        tables.pop(request_id, None)
    for new in out.scheduled_new_reqs:
        assert new.request_id not in tables
        tables[new.request_id] = list(new.block_ids)
    cached = out.scheduled_cached_reqs
    for request_id, resumed, new_block_ids in zip(cached.request_ids,
                                                  cached.resumed_from_preemption,
                                                  cached.new_block_ids, strict=True):
        if resumed:
            tables[request_id] = list(new_block_ids)
        else:
            tables[request_id].extend(new_block_ids)
    for request in sched.running:
        assert tables[request.request_id] == blocks(sched, request)


def blocks(sched: Scheduler, request: Request) -> list[int]:
    """The request's block table, from its one owner."""
    return sched.kv_cache_manager.get_block_ids(request.request_id)


def step_table(sched: Scheduler, request: Request) -> list[int]:
    """The block table the last step ran the request with (the runner's view: it outlives
    the request's blocks when that step finished it)."""
    return _RUNNER_TABLES[sched][request.request_id]


def scheduled(out: SchedulerOutput) -> list[tuple[str, int]]:
    return list(out.num_scheduled_tokens.items())


def free_ids(sched: Scheduler) -> list[int]:
    return sched.kv_cache_manager.block_pool.free_block_queue.block_ids()


def ref_counts(sched: Scheduler) -> list[int]:
    return [b.ref_cnt for b in sched.kv_cache_manager.block_pool.blocks]


def assert_pool_full(sched: Scheduler) -> None:
    pool = sched.kv_cache_manager.block_pool
    assert pool.num_free_blocks == pool.num_blocks
    assert sorted(free_ids(sched)) == list(range(pool.num_blocks))
    assert all(c == 0 for c in ref_counts(sched))
    assert sched.kv_cache_manager.req_to_blocks == {}


def run_to_completion(sched: Scheduler, max_steps: int = 200) -> int:
    for num_steps in range(1, max_steps + 1):
        step(sched)
        if not sched.has_unfinished_requests():
            return num_steps
    raise AssertionError(f"requests still unfinished after {max_steps} steps: "
                         f"{list(sched.waiting)} {sched.running}")


def test_budget_goes_to_running_then_waiting_fcfs():
    sched = make_scheduler(max_num_batched_tokens=10)
    a, b, c = make_request("a", 6), make_request("b", 6, first_token=100), make_request("c", 3)
    for r in (a, b, c):
        sched.add_request(r)

    out = step(sched)
    # a fits whole; b gets the 4 tokens left (a chunk); c, behind b, waits.
    assert scheduled(out) == [("a", 6), ("b", 4)]
    assert (blocks(sched, a), blocks(sched, b)) == ([0, 1], [2])
    assert [r.request_id for r in sched.running] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]
    assert (a.status, b.status, c.status) == (RequestStatus.RUNNING, RequestStatus.RUNNING,
                                              RequestStatus.WAITING)
    assert a.output_token_ids == [1000] and b.output_token_ids == []

    out = step(sched)
    # Running first (a's decode, b's last 2 prompt tokens), then c from the waiting queue.
    assert scheduled(out) == [("a", 1), ("b", 2), ("c", 3)]
    assert (blocks(sched, a), blocks(sched, b), blocks(sched, c)) == ([0, 1], [2, 3], [4])
    assert not sched.waiting

    out = step(sched)
    assert scheduled(out) == [("a", 1), ("b", 1), ("c", 1)]
    out = step(sched)
    assert scheduled(out) == [("a", 1), ("b", 1), ("c", 1)]
    assert blocks(sched, a) == [0, 1, 5]  # a's 9th token opened a third block
    assert (a.num_computed_tokens, b.num_computed_tokens, c.num_computed_tokens) == (9, 8, 5)
    assert (a.output_token_ids, b.output_token_ids, c.output_token_ids) == (
        [1000, 1001, 1002, 1003], [1000, 1001, 1002], [1000, 1001, 1002])


def test_head_of_queue_that_does_not_fit_blocks_later_arrivals():
    # 3 blocks: the 16-token head cannot get its 4, and the 2-token request behind it must
    # not overtake it.
    sched = make_scheduler(num_blocks=3)
    sched.add_request(make_request("long", 16))
    sched.add_request(make_request("short", 2))
    out = sched.schedule()
    assert out.is_empty and scheduled(out) == []
    assert [r.request_id for r in sched.waiting] == ["long", "short"]
    assert free_ids(sched) == [0, 1, 2]


def test_chunked_prefill_does_not_stall_decodes():
    sched = make_scheduler(max_num_batched_tokens=8)
    d, long = make_request("d", 2), make_request("long", 30, first_token=100)
    sched.add_request(d)
    sched.add_request(long)

    out = step(sched)
    assert scheduled(out) == [("d", 2), ("long", 6)]
    late = make_request("late", 3, first_token=200)
    sched.add_request(late)
    chunks = [6]
    # While the long prompt is prefilled chunk by chunk, d decodes one token every step,
    # and the request that arrived later waits until the budget has room.
    for _ in range(3):
        out = step(sched)
        assert scheduled(out) == [("d", 1), ("long", 7)]
        chunks.append(7)
        assert long.num_tokens == 30  # no token is sampled from a partial prompt
        assert [r.request_id for r in sched.waiting] == ["late"]
    out = step(sched)
    assert scheduled(out) == [("d", 1), ("long", 3), ("late", 3)]
    chunks.append(3)
    assert sum(chunks) == 30
    assert long.num_computed_tokens == 30 and long.output_token_ids == [1000]
    assert d.output_token_ids == [1000, 1001, 1002, 1003, 1004]
    # 30 tokens over 8 blocks, taken step by step as d's table grew too.
    assert blocks(sched, long) == [1, 2, 3, 4, 5, 7, 8, 9]
    assert (blocks(sched, d), blocks(sched, late)) == ([0, 6], [10])

    out = step(sched)
    assert scheduled(out) == [("d", 1), ("long", 1), ("late", 1)]
    assert long.output_token_ids == [1000, 1001]


def test_max_num_seqs_caps_running_requests():
    sched = make_scheduler(max_num_seqs=2)
    a = make_request("a", 3, max_tokens=1)
    b, c, d = (make_request(x, 3, max_tokens=10) for x in "bcd")
    for r in (a, b, c, d):
        sched.add_request(r)

    out = step(sched)
    assert scheduled(out) == [("a", 3), ("b", 3)]
    assert [r.request_id for r in sched.waiting] == ["c", "d"]
    # a reached max_tokens after one token and was finished (and freed) by the engine.
    assert a.status == RequestStatus.FINISHED_LENGTH and out.scheduled_new_reqs[0].block_ids == [0]
    assert sched.kv_cache_manager.get_block_ids("a") == [] and 0 in free_ids(sched)

    out = step(sched)
    assert scheduled(out) == [("b", 1), ("c", 3)]
    assert out.finished_request_ids == ["a"]
    assert [r.request_id for r in sched.waiting] == ["d"]
    out = step(sched)
    assert scheduled(out) == [("b", 1), ("c", 1)]
    assert out.finished_request_ids == []


def test_preemption_of_latest_admitted_request_loses_nothing():
    # 5 blocks of 4 tokens and a budget of 3 tokens a step.
    sched = make_scheduler(num_blocks=5, max_num_batched_tokens=3)
    r = make_request("r", 4, max_tokens=8)
    v = make_request("v", 8, max_tokens=4, first_token=100)
    sched.add_request(r)
    sched.add_request(v)
    outs = [step(sched) for _ in range(6)]
    assert [scheduled(o) for o in outs] == [
        [("r", 3)],
        [("r", 1), ("v", 2)],
        [("r", 1), ("v", 2)],
        [("r", 1), ("v", 2)],
        [("r", 1), ("v", 2)],
        [("r", 1), ("v", 1)],
    ]
    assert (blocks(sched, r), blocks(sched, v)) == ([0, 2], [1, 3, 4])
    assert free_ids(sched) == []
    assert v.num_computed_tokens == 9 and v.output_token_ids == [1000, 1001]
    assert sched.num_preemptions == 0

    # r's 9th token needs a third block and none is free: v, admitted last, is preempted.
    out = step(sched)
    assert scheduled(out) == [("r", 1)]
    assert out.preempted_request_ids == ["v"]
    assert blocks(sched, r) == [0, 2, 4]
    assert v.status == RequestStatus.PREEMPTED
    assert v.num_computed_tokens == 0 and blocks(sched, v) == []
    assert sched.kv_cache_manager.get_block_ids("v") == []
    assert v.all_token_ids == list(range(100, 108)) + [1000, 1001]  # sampled tokens kept
    assert [x.request_id for x in sched.waiting] == ["v"]
    assert sched.running == [r]
    assert (v.num_preemptions, sched.num_preemptions) == (1, 1)
    # v's blocks went back to the pool (tail first). A 2-token chunk of v would fit in them,
    # but nothing is admitted in a step that preempted.
    assert free_ids(sched) == [3, 1]
    assert [ref_counts(sched)[i] for i in (1, 3)] == [0, 0]

    out = step(sched)
    assert scheduled(out) == [("r", 1), ("v", 2)]  # readmitted, recomputed from scratch
    assert out.preempted_request_ids == []
    assert v.status == RequestStatus.RUNNING and blocks(sched, v) == [3]
    assert v.num_computed_tokens == 2

    run_to_completion(sched)
    # Every sampled token exactly once: the two from before the preemption and two more.
    assert v.output_token_ids == [1000, 1001, 1002, 1003]
    assert r.output_token_ids == list(range(1000, 1008))
    assert (r.status, v.status) == (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_LENGTH)
    assert_pool_full(sched)


def test_request_needing_a_block_preempts_itself_when_it_is_the_latest():
    sched = make_scheduler(num_blocks=2)
    a, b = make_request("a", 3), make_request("b", 4, first_token=100)
    sched.add_request(a)
    sched.add_request(b)
    assert scheduled(step(sched)) == [("a", 3), ("b", 4)]
    # a's 4th token fits its block; b's 5th needs a block and b is the latest admitted.
    out = step(sched)
    assert scheduled(out) == [("a", 1)]
    assert out.preempted_request_ids == ["b"]
    assert sched.running == [a] and list(sched.waiting) == [b]
    assert b.all_token_ids == list(range(100, 104)) + [1000]
    assert free_ids(sched) == [1]


def test_preempted_request_reuses_its_cached_blocks_on_readmission():
    sched = make_scheduler(num_blocks=5, enable_caching=True)
    a = make_request("a", 4, max_tokens=6)
    b = make_request("b", 12, max_tokens=3, first_token=100)
    sched.add_request(a)
    sched.add_request(b)
    assert scheduled(step(sched)) == [("a", 4), ("b", 12)]
    assert (blocks(sched, a), blocks(sched, b)) == ([0], [1, 2, 3])
    out = step(sched)
    # a takes the last free block; b's 13th token needs a fourth: b preempts itself.
    assert scheduled(out) == [("a", 1)] and out.preempted_request_ids == ["b"]
    assert free_ids(sched) == [3, 2, 1]
    # b's three full blocks stay cached, but b needs 4 blocks and only 3 are not a's.
    for _ in range(3):
        out = step(sched)
        assert scheduled(out) == [("a", 1)]
        assert [x.request_id for x in sched.waiting] == ["b"]
    out = step(sched)  # a's 9th token evicts b's least recently freed block (3)
    assert scheduled(out) == [("a", 1)] and step_table(sched, a) == [0, 4, 3]
    assert a.status == RequestStatus.FINISHED_LENGTH

    out = step(sched)
    # Readmitted: blocks 1 and 2 come from the prefix cache, only 13 - 8 tokens are computed.
    assert scheduled(out) == [("b", 5)]
    assert out.finished_request_ids == ["a"]
    assert b.num_cached_tokens == 8
    assert blocks(sched, b)[:2] == [1, 2]
    assert b.output_token_ids == [1000, 1001]
    run_to_completion(sched)
    assert b.output_token_ids == [1000, 1001, 1002]
    assert_pool_full(sched)


def test_abort_waiting_and_running_requests_frees_their_blocks():
    sched = make_scheduler(num_blocks=8, max_num_batched_tokens=11, enable_caching=True)
    a, b = make_request("a", 6), make_request("b", 5, first_token=100)
    c = make_request("c", 4, first_token=200)
    for r in (a, b, c):
        sched.add_request(r)
    assert scheduled(step(sched)) == [("a", 6), ("b", 5)]
    assert (blocks(sched, a), blocks(sched, b)) == ([0, 1], [2, 3])
    assert [r.request_id for r in sched.waiting] == ["c"]
    kvm = sched.kv_cache_manager

    sched.finish_requests([c], RequestStatus.FINISHED_ABORTED)
    assert c.status == RequestStatus.FINISHED_ABORTED
    assert not sched.waiting
    assert "c" not in kvm.req_to_blocks and "c" not in kvm.req_to_hashes
    assert free_ids(sched) == [4, 5, 6, 7]

    sched.finish_requests([b], RequestStatus.FINISHED_ABORTED)
    assert sched.running == [a]
    assert free_ids(sched) == [4, 5, 6, 7, 3, 2]  # tail block first
    assert [ref_counts(sched)[i] for i in (0, 1, 2, 3)] == [1, 1, 0, 0]
    assert "b" not in kvm.req_to_blocks and "b" not in kvm.req_to_hashes

    # Aborting again changes nothing: no double free, no second report.
    sched.finish_requests([b, c], RequestStatus.FINISHED_ABORTED)
    assert kvm.num_free_blocks == 6

    out = step(sched)
    assert scheduled(out) == [("a", 1)]
    assert out.finished_request_ids == ["c", "b"]
    assert step(sched).finished_request_ids == []

    sched.finish_requests([a], RequestStatus.FINISHED_ABORTED)
    assert not sched.has_unfinished_requests()
    assert step(sched).finished_request_ids == ["a"]
    assert_pool_full(sched)


def test_abort_mid_prefill_and_while_preempted():
    sched = make_scheduler(num_blocks=4, max_num_batched_tokens=6)
    a, long = make_request("a", 3), make_request("long", 14, first_token=100)
    sched.add_request(a)
    sched.add_request(long)
    assert scheduled(step(sched)) == [("a", 3), ("long", 3)]
    assert scheduled(step(sched)) == [("a", 1), ("long", 5)]
    assert blocks(sched, long) == [1, 2]
    # a's 5th token takes the last free block; long's next chunk needs two more, so long
    # (the latest admitted) preempts itself.
    out = step(sched)
    assert scheduled(out) == [("a", 1)] and out.preempted_request_ids == ["long"]
    assert long.status == RequestStatus.PREEMPTED and list(sched.waiting) == [long]
    sched.finish_requests([long], RequestStatus.FINISHED_ABORTED)
    assert not sched.waiting and long.status == RequestStatus.FINISHED_ABORTED
    assert blocks(sched, a) == [0, 3] and free_ids(sched) == [2, 1]

    mid = make_request("mid", 10, first_token=200)
    sched.add_request(mid)
    out = step(sched)
    assert scheduled(out) == [("a", 1), ("mid", 5)] and out.finished_request_ids == ["long"]
    assert mid.num_computed_tokens == 5 and blocks(sched, mid) == [2, 1]
    sched.finish_requests([mid, a], RequestStatus.FINISHED_ABORTED)
    assert step(sched).finished_request_ids == ["mid", "a"]
    assert_pool_full(sched)


def test_prefix_cache_hits_at_admission_reduce_scheduled_tokens():
    sched = make_scheduler(num_blocks=16, max_num_batched_tokens=10, enable_caching=True)
    a = make_request("a", 10, max_tokens=3)
    sched.add_request(a)
    assert scheduled(step(sched)) == [("a", 10)]
    assert blocks(sched, a) == [0, 1, 2] and a.num_cached_tokens == 0

    b = Request("b", list(range(8)) + [50, 51], a.sampling_params, max_tokens=3)
    c = make_request("c", 8, max_tokens=3)  # exactly a's two full blocks
    d = make_request("d", 10, max_tokens=3)  # a's whole prompt
    for r in (b, c, d):
        sched.add_request(r)
    out = step(sched)
    # Without hits b alone would need 10 tokens. c recomputes its last block: at least its
    # last token must run to give logits.
    assert scheduled(out) == [("a", 1), ("b", 2), ("c", 4), ("d", 2)]
    assert out.total_num_scheduled_tokens == 9
    assert (b.num_cached_tokens, c.num_cached_tokens, d.num_cached_tokens) == (8, 4, 8)
    assert (b.num_computed_tokens, c.num_computed_tokens, d.num_computed_tokens) == (10, 8, 10)
    assert (blocks(sched, b), blocks(sched, c), blocks(sched, d)) == ([0, 1, 3], [0, 4], [0, 1, 5])
    assert ref_counts(sched)[:6] == [4, 3, 1, 1, 1, 1]
    assert all(r.output_token_ids == [1000] for r in (b, c, d))

    run_to_completion(sched)
    assert_pool_full(sched)
    # Freed blocks keep their hashes: a later request with a's prompt still hits them.
    e = make_request("e", 10, max_tokens=1)
    sched.add_request(e)
    out = step(sched)
    assert scheduled(out) == [("e", 2)]
    assert e.num_cached_tokens == 8 and out.scheduled_new_reqs[0].block_ids[:2] == [0, 1]
    assert e.status == RequestStatus.FINISHED_LENGTH
    assert_pool_full(sched)
