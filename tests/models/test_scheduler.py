"""Iteration-level batching (tallow.models.scheduler) on a small random GPT-2."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest
import torch

from tallow.models import load
from tallow.models.generation import SamplingParams, next_tokens
from tallow.models.scheduler import GenerationLoop, GenerationScheduler, KVPoolFull

PROMPTS = ["Return the number of items", "A", "The quick brown fox jumps over the lazy dog and", "def f(a, b):"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0, stop_at_eos=False)
SAMPLED = SamplingParams(max_new_tokens=14, temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.2,
                         stop_at_eos=False, seed=1234)


@pytest.fixture(scope="module")
def model(gpt2_dir):
    return load(gpt2_dir)


@pytest.fixture(scope="module")
def int8_model(gpt2_dir):
    return load(gpt2_dir, quantize="int8")


@pytest.fixture(scope="module")
def ids(model):
    return model.tokenizer.encode_ids(PROMPTS)


def run(sched, arrivals, max_steps=500):
    """Steps ``sched``; arrivals {step: [(request, prompts, params), ...]} are
    added before that step. Returns {request: {row: [token ids]}}, {request:
    {row: finish_reason}}, {request: {row: text}} and the stats after each step."""
    toks, reasons, texts, stats = {}, {}, {}, []
    step = 0
    while step < max_steps:
        for req, prompts, params in arrivals.get(step, []):
            sched.add(req, prompts, params)
        if sched.idle and step >= max(arrivals, default=0):
            break
        for ev in sched.step():
            if ev.token_id >= 0:
                toks.setdefault(ev.request, {}).setdefault(ev.row, []).append(ev.token_id)
            texts.setdefault(ev.request, {}).setdefault(ev.row, "")
            texts[ev.request][ev.row] += ev.text
            if ev.finish_reason is not None:
                assert ev.row not in reasons.get(ev.request, {}), "a row finished twice"
                reasons.setdefault(ev.request, {})[ev.row] = ev.finish_reason
        stats.append(sched.stats())
        step += 1
    assert sched.idle
    return toks, reasons, texts, stats


def alone(model, prompts, params):
    toks, reasons, texts, _ = run(GenerationScheduler(model), {0: [("r", prompts, params)]})
    return toks["r"], reasons["r"], texts["r"]


def test_greedy_equals_generate_ids_and_transformers(model, ids, gpt2_dir):
    from transformers import GPT2LMHeadModel as HF

    hf = HF.from_pretrained(gpt2_dir).eval()
    # three requests arriving at different steps, one of them with two rows
    toks, reasons, _, _ = run(GenerationScheduler(model, max_rows=8), {
        0: [("a", [ids[0]], [GREEDY])],
        2: [("b", [ids[1], ids[2]], [GREEDY, GREEDY])],
        5: [("c", [ids[3]], [GREEDY])],
    })
    got = [toks["a"][0], toks["b"][0], toks["b"][1], toks["c"][0]]
    lib = {}
    for ev in model.generate_ids(ids, GREEDY):
        lib.setdefault(ev.index, []).append(ev.token_id)
    for i, p in enumerate(ids):
        with torch.no_grad():
            expected = hf.generate(input_ids=torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                   max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
        assert got[i] == expected[0, len(p):].tolist() == lib[i], f"prompt {i}"
    assert reasons == {"a": {0: "length"}, "b": {0: "length", 1: "length"}, "c": {0: "length"}}


@pytest.mark.parametrize("which", ["fp32", "int8"])
def test_seeded_and_greedy_rows_do_not_depend_on_their_neighbours(which, model, int8_model, ids):
    m = model if which == "fp32" else int8_model
    target = [ids[2], ids[0]]
    params = [SAMPLED, replace(GREEDY, max_new_tokens=9)]
    ref_toks, _, ref_text = alone(m, target, params)
    # alone as a single row too (its own batch of 1 at every step), bit-exact with batch_invariant
    solo = run(GenerationScheduler(m, batch_invariant=True), {0: [("r", target[:1], params[:1])]})[0]["r"]
    assert solo[0] == ref_toks[0]
    others = [
        SamplingParams(max_new_tokens=5, temperature=1.3, seed=5, stop_at_eos=False),
        SamplingParams(max_new_tokens=20, temperature=0.7, top_k=7, repetition_penalty=1.5, seed=None),
        SamplingParams(max_new_tokens=3, temperature=0),
        SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.5, seed=99),
    ]
    toks, _, texts, stats = run(GenerationScheduler(m, max_rows=8), {
        0: [("x", [ids[1], ids[3]], others[:2])],
        1: [("y", [ids[0]], others[2:3])],
        3: [("target", target, params)],  # joins a running batch of rows at other positions
        4: [("z", [ids[3], ids[1], ids[2]], [others[3], others[0], others[1]])],
    })
    assert toks["target"] == ref_toks
    assert texts["target"] == ref_text
    assert max(s["running_rows"] for s in stats) >= 6  # it did share its batch


def test_decode_logits_batch_invariance(model, int8_model, ids):
    """The forward pass itself: a row's prefill and decode logits alone vs
    among other rows at other positions. INT8: bit-equal for every batch size.
    fp32: bit-equal for every batch of >= 2 rows (Dense pads the GEMM's rows
    to its 4-row tile); a lone row's linears take torch's GEMV, which rounds
    differently (~1e-6), unless tiled_gemm() (batch_invariant=True) is on."""
    from tallow.models.layers import tiled_gemm

    def decode(m, rows):
        k, v = m.new_cache(len(rows), 64)
        kv = ([k[i].zero_() for i in range(len(m.h))], [v[i].zero_() for i in range(len(m.h))])
        first = m.prefill_rows([ids[r] for r in rows], kv)
        return first, m.decode_rows(first.argmax(-1), torch.tensor([len(ids[r]) for r in rows]), kv)

    for m in (model, int8_model):
        p1, d1 = decode(m, [2])
        p3, d3 = decode(m, [0, 2, 1])
        p5, d5 = decode(m, [3, 1, 0, 3, 2])
        assert torch.equal(p3[1], p5[4]) and torch.equal(d3[1], d5[4])
        if m is int8_model:
            assert torch.equal(p1[0], p3[1]) and torch.equal(d1[0], d3[1])
        else:
            err = max(float((a - b).abs().max() / b.abs().max()) for a, b in ((p1[0], p3[1]), (d1[0], d3[1])))
            print(f"fp32 logits, row alone (GEMV) vs in a batch: max |diff| / max |logit| = {err:.1e}")
            assert err < 1e-5
            with tiled_gemm():
                p1, d1 = decode(m, [2])
            assert torch.equal(p1[0], p3[1]) and torch.equal(d1[0], d3[1])


def test_per_row_settings_in_one_request(model, ids):
    greedy_alone, _, _ = alone(model, [ids[0]], [GREEDY])
    full = alone(model, [ids[2]], [replace(GREEDY, max_new_tokens=30)])[2][0]
    stop = full[3:6]
    params = [GREEDY, SAMPLED, replace(GREEDY, max_new_tokens=30, stop=[stop]), replace(GREEDY, max_new_tokens=4)]
    toks, reasons, texts, _ = run(GenerationScheduler(model), {0: [("r", [ids[0], ids[1], ids[2], ids[3]], params)]})
    assert toks["r"][0] == greedy_alone[0]
    assert len(toks["r"][1]) == 14 and toks["r"][1] != toks["r"][0]
    assert reasons["r"] == {0: "length", 1: "length", 2: "stop", 3: "length"}
    assert texts["r"][2] == full[: full.find(stop)]
    assert len(toks["r"][3]) == 4


def test_eos_ends_a_row_and_is_not_streamed(gpt2_dir, ids):
    m = load(gpt2_dir)
    free = alone(m, [ids[2]], [GREEDY])[0][0]
    eos = free[4]  # make the 5th greedy token the end of text
    m.config.eos_token_id = eos
    toks, reasons, texts = alone(m, [ids[2], ids[2]], [replace(GREEDY, stop_at_eos=True), GREEDY])
    cut = free.index(eos)
    assert toks[0] == free[: cut + 1] and reasons[0] == "eos"
    assert texts[0] == m.tokenizer.decode(free[:cut])
    assert toks[1] == free and reasons[1] == "length"


def test_a_rows_stop_token_id_ends_that_row_with_stop_and_is_not_streamed(model, ids):
    free = alone(model, [ids[2]], [GREEDY])[0][0]
    end_of_turn = free[4]  # the 5th greedy token plays a chat template's end of turn
    cut = free.index(end_of_turn)
    # stop_at_eos=False: stop ids are the caller's, honoured anyway; the other row runs on to its length
    sched = GenerationScheduler(model)
    sched.add("r", [ids[2], ids[2]], [replace(GREEDY, stop_token_ids=[end_of_turn]), GREEDY])
    ended_at = {}
    step = 0
    while not sched.idle:
        for ev in sched.step():
            if ev.finish_reason is not None:
                ended_at[ev.row] = (step, ev.finish_reason)
        step += 1
    assert ended_at[0] == (cut, "stop")  # the step that sampled it, not when the request ended
    assert ended_at[1] == (len(free) - 1, "length")
    toks, reasons, texts = alone(model, [ids[2]], [replace(GREEDY, stop_token_ids=(end_of_turn,))])
    assert toks[0] == free[: cut + 1] and reasons[0] == "stop"
    assert texts[0] == model.tokenizer.decode(free[:cut])


def test_stop_token_ids_are_checked(model, ids):
    for bad in (["x"], [-1], [True], 3.5):
        with pytest.raises(ValueError, match="stop_token_ids"):
            GenerationScheduler(model).add("r", [ids[0]], [replace(GREEDY, stop_token_ids=bad)])


def test_max_new_tokens_zero_ends_at_once(model, ids):
    sched = GenerationScheduler(model)
    sched.add("r", [ids[0], ids[1]], [replace(GREEDY, max_new_tokens=0), replace(GREEDY, max_new_tokens=2)])
    first = sched.step()
    assert [(e.row, e.token_id, e.finish_reason) for e in first][0] == (0, -1, "length")
    run(sched, {})


def test_cancel_frees_slots_and_leaves_the_others_intact(model, ids):
    ref = alone(model, [ids[2]], [replace(GREEDY, max_new_tokens=20)])[0]
    sched = GenerationScheduler(model, max_rows=4)
    sched.add("a", [ids[0], ids[1]], [replace(GREEDY, max_new_tokens=40)] * 2)
    sched.add("b", [ids[2]], [replace(GREEDY, max_new_tokens=20)])
    sched.add("c", [ids[3]] * 3, [GREEDY] * 3)  # does not fit max_rows next to a and b: waits
    sched.step()
    s = sched.stats()
    assert (s["running_rows"], s["running_requests"], s["waiting_requests"]) == (3, 2, 1)
    sched.cancel("c")
    assert sched.stats()["waiting_requests"] == 0
    sched.step()
    sched.cancel("a")  # rows 0 and 1: b's row moves into slot 0
    s = sched.stats()
    assert s["running_rows"] == 1 and s["kv_bytes_reserved"] == (len(ids[2]) + 20) * model.kv_bytes_per_token()
    toks, _, _, _ = run(sched, {})
    assert ref[0][:2] + toks["b"][0] == ref[0]
    assert sched.stats()["kv_bytes_in_use"] == 0  # the pool is freed once nothing runs
    sched.cancel("unknown")  # ignored


def test_kv_budget_never_fit_raises_and_too_big_for_now_waits(model, ids):
    bpt = model.kv_bytes_per_token()
    budget = 2 * 40 * bpt  # two rows of 40 positions
    sched = GenerationScheduler(model, max_rows=8, kv_budget_bytes=budget)
    with pytest.raises(KVPoolFull, match=r"3 rows x 30 tokens .* kv_budget_bytes"):
        sched.add("big", [ids[1]] * 3, [replace(GREEDY, max_new_tokens=29)] * 3)
    with pytest.raises(KVPoolFull, match="1 rows x 81 tokens"):
        sched.add("long", [ids[1]], [replace(GREEDY, max_new_tokens=80)])
    later = [ids[0], ids[3]]
    ref = alone(model, later, [replace(GREEDY, max_new_tokens=30)] * 2)[0]
    toks, _, _, stats = run(sched, {
        0: [("first", [ids[1]], [replace(GREEDY, max_new_tokens=30)])],
        1: [("later", later, [replace(GREEDY, max_new_tokens=30)] * 2),
            ("small", [ids[1]], [replace(GREEDY, max_new_tokens=3)])],  # FIFO: waits behind "later"
    })
    assert stats[1]["waiting_requests"] == 2 and stats[1]["running_rows"] == 1
    assert all(s["kv_bytes_in_use"] <= budget and s["kv_budget_bytes"] == budget for s in stats)
    assert toks["later"] == ref and len(toks["small"][0]) == 3
    first_done = next(i for i, s in enumerate(stats) if s["running_requests"] == 0 or i > 30)
    assert first_done > 1


def test_pool_grows_within_the_budget(model, ids):
    bpt = model.kv_bytes_per_token()
    sched = GenerationScheduler(model, max_rows=8, kv_budget_bytes=4 * 100 * bpt)
    sched.add("a", [ids[1]], [replace(GREEDY, max_new_tokens=5)])
    sched.step()
    small = sched.stats()["kv_bytes_in_use"]
    sched.add("b", [ids[0], ids[2]], [replace(GREEDY, max_new_tokens=60)] * 2)
    sched.step()
    s = sched.stats()
    assert small < s["kv_bytes_in_use"] <= s["kv_budget_bytes"]
    held = sum(t.numel() * t.element_size() for t in sched._keys + sched._values)
    assert held == s["kv_bytes_in_use"]
    run(sched, {})


def test_validation_names_what_is_wrong(model, ids):
    sched = GenerationScheduler(model)
    for prompts, params, match in [
        ([[]], [GREEDY], "prompt 0 is empty"),
        ([ids[0], [5, 600]], [GREEDY, GREEDY], r"prompt 1 has token ids outside \[0, 600\)"),
        ([ids[0]], [replace(GREEDY, max_new_tokens=127)], "context limit of 128"),
        ([ids[0], ids[1]], [GREEDY, replace(GREEDY, top_p=0)], "row 1: top_p"),
        ([ids[0]], [GREEDY, GREEDY], "1 prompts but 2 SamplingParams"),
        ([], [], "at least one prompt"),
    ]:
        with pytest.raises(ValueError, match=match):
            sched.add("r", prompts, params)
    sched.add("r", [ids[0]], [GREEDY])
    with pytest.raises(ValueError, match="already waiting or running"):
        sched.add("r", [ids[0]], [GREEDY])
    assert sched.stats()["waiting_requests"] == 1


def test_sampler_rows_are_independent():
    """next_tokens over a batch of mixed settings = each row alone with its own generator."""
    torch.manual_seed(0)
    logits = torch.randn(6, 600) * 3
    seen = torch.rand(6, 600) < 0.05
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=20, seed=1),
              SamplingParams(temperature=1.2, top_p=0.7, repetition_penalty=1.3, seed=2),
              SamplingParams(temperature=0.8, top_k=20, seed=3), SamplingParams(temperature=1e-309, seed=4),
              SamplingParams(temperature=1.0, repetition_penalty=0.8, seed=5)]
    gens = lambda: [None if p.greedy else torch.Generator().manual_seed(p.seed) for p in params]
    batch = next_tokens(logits, params, seen, gens())
    single = [int(next_tokens(logits[i:i + 1], params[i:i + 1], seen[i:i + 1], gens()[i:i + 1])) for i in range(6)]
    assert batch.tolist() == single
    # over many draws a row follows its distribution (top_k=1 is greedy)
    g = torch.Generator().manual_seed(0)
    tk1 = next_tokens(logits[:1].expand(50, -1), SamplingParams(temperature=2.0, top_k=1), seen[:1].expand(50, -1), g)
    assert (tk1 == logits[0].argmax()).all()


def _hf_top_k_top_p(logits, top_k, top_p):
    """The test's oracle: Hugging Face's TopK then TopP warpers, written out
    (top-p's probabilities in float64: the definition, without float32's
    rounding of the running mass)."""
    if top_k:
        logits = logits.masked_fill(logits < torch.topk(logits, top_k).values[..., -1:], float("-inf"))
    if top_p < 1:
        srt, order = torch.sort(logits, descending=True)
        probs = torch.softmax(srt.double(), -1)
        drop = (torch.cumsum(probs, -1) - probs) >= top_p
        drop[..., 0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return logits


def test_top_k_top_p_candidates_keep_hugging_faces_sets():
    from tallow.models.generation import filter_top_k_top_p

    torch.manual_seed(0)
    # peaked rows (nucleus in the top 64), wider ones (top 1024), flat ones (full sort)
    logits = torch.cat([torch.randn(3, 5000) * 8, torch.randn(3, 5000) * 2.5, torch.randn(3, 5000) * 0.1])
    for top_k, top_p in [(0, 0.9), (0, 0.5), (0, 0.999), (50, 1.0), (40, 0.8), (1, 0.3), (0, 1.0)]:
        ours = filter_top_k_top_p(logits, top_k, top_p)
        ref = _hf_top_k_top_p(logits, top_k, top_p)
        assert torch.equal(torch.isinf(ours), torch.isinf(ref)), (top_k, top_p)


def test_inverse_cdf_draw_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0]]).expand(40000, -1)
    probs = torch.softmax(logits[0] / 0.7, -1)
    toks = next_tokens(logits, SamplingParams(temperature=0.7), torch.zeros(40000, 5, dtype=torch.bool),
                       torch.Generator().manual_seed(0))
    freq = torch.bincount(toks, minlength=5).double() / 40000
    assert (freq - probs.double()).abs().max() < 0.01
    # p = (0.644, 0.237, 0.087, ...): top_p=0.8 keeps tokens 0 and 1 (mass before token 2 is 0.88)
    nucleus = next_tokens(logits[:4000], SamplingParams(temperature=1.0, top_p=0.8),
                          torch.zeros(4000, 5, dtype=torch.bool), torch.Generator().manual_seed(1))
    assert set(nucleus.tolist()) == {0, 1}
    assert abs(float((nucleus == 0).double().mean()) - 0.644 / (0.644 + 0.237)) < 0.03


def test_unseeded_rows_follow_torch_manual_seed(model, ids):
    p = replace(SAMPLED, seed=None)
    torch.manual_seed(42)
    a = alone(model, [ids[0]], [p])[0]
    torch.manual_seed(42)
    b = alone(model, [ids[0]], [p])[0]
    c = alone(model, [ids[0]], [p])[0]
    assert a == b != c


def test_generate_ids_seeded_batch_is_reproducible_per_row(model, ids):
    params = replace(SAMPLED, seed=7)
    rows = {}
    for ev in model.generate_ids([ids[0], ids[1]], params):
        rows.setdefault(ev.index, []).append(ev.token_id)
    assert rows[0] == alone(model, [ids[0]], [params])[0][0]  # row 0: seed 7
    assert rows[1] == alone(model, [ids[1]], [replace(params, seed=8)])[0][0]  # row 1: seed 8


class CountingScheduler(GenerationScheduler):
    """Counts how often the loop asks whether there is work: a loop that
    sleeps on its condition while idle asks once, a busy-waiting one keeps asking."""

    idle_checks = 0

    @property
    def idle(self) -> bool:
        self.idle_checks += 1
        return super().idle


def test_generation_loop_emits_isolates_errors_and_closes(model, ids):
    ref = alone(model, [ids[2]], [GREEDY])[0][0]
    sched = CountingScheduler(model)
    original = sched._row_token

    def faulty(row, token):  # fault injection: request "bad" fails at its third token
        if row.request == "bad" and len(row.out) == 2:
            raise RuntimeError("boom")
        return original(row, token)

    sched._row_token = faulty
    batches, done = [], threading.Event()
    finished = {}

    def emit(events):
        batches.append(events)
        for e in events:
            if e.finish_reason:
                finished[(e.request, e.row)] = e
        if {("good", 0), ("bad", 0), ("bad", 1), ("after", 0)} <= finished.keys():
            done.set()

    loop = GenerationLoop(sched, emit)
    try:
        deadline = time.monotonic() + 30  # a guard against a hang, not a speed bound
        while sched.idle_checks == 0:  # the loop thread has started and found nothing to do
            assert time.monotonic() < deadline
            time.sleep(0.01)
        checks = sched.idle_checks
        time.sleep(0.3)
        assert sched.idle_checks == checks, "the idle loop busy-waits"
        with pytest.raises(ValueError, match="prompt 0 is empty"):
            loop.submit("x", [[]], [GREEDY])  # raised in the caller's thread
        loop.submit("good", [ids[2]], [GREEDY])
        loop.submit("bad", [ids[0], ids[1]], [GREEDY, GREEDY])
        time.sleep(0.05)
        loop.submit("after", [ids[3]], [replace(GREEDY, max_new_tokens=3)])
        assert done.wait(30)
    finally:
        loop.close()
    assert not loop.alive
    assert finished[("bad", 0)].finish_reason == finished[("bad", 1)].finish_reason == "error"
    assert "RuntimeError: boom" in finished[("bad", 0)].error
    good = [e.token_id for b in batches for e in b if e.request == "good"]
    assert good == ref and finished[("good", 0)].finish_reason == "length"
    assert finished[("after", 0)].finish_reason == "length"
    assert all(len({(e.request, e.row) for e in b}) == len(b) for b in batches)  # one event per row per step
    with pytest.raises(RuntimeError, match="closed"):
        loop.submit("late", [ids[0]], [GREEDY])
