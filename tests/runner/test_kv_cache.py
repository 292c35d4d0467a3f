"""Ragged batches on the per-row KV cache give exactly the tokens of each request decoded alone (fp32)."""

from __future__ import annotations

import pytest
import torch

from runner.generate import decode_step, greedy_batch, greedy_reference, prefill
from runner.kv_cache import KVCache


def test_batched_mixed_positions_equal_reference(decoder_model, make_prompts):
    model, args = decoder_model
    prompts = make_prompts(5, args.vocab_size, seed=1)
    refs = [greedy_reference(model, p, 8) for p in prompts]
    model.setup_cache(5, 32)
    # All prompts prefilled together (different lengths), then decoded together at different positions.
    tok = prefill(model, prompts, range(5))
    outs = [[t] for t in tok.tolist()]
    for _ in range(7):
        tok = decode_step(model, tok, range(5))
        for o, t in zip(outs, tok.tolist()):
            o.append(t)
    assert outs == refs
    assert model.cache.lengths[:5].tolist() == [len(p) + 7 for p in prompts]


def test_join_mid_batch_and_compaction_equal_reference(decoder_model, make_prompts):
    model, args = decoder_model
    prompts = make_prompts(7, args.vocab_size, seed=2)
    budgets = [3, 9, 5, 12, 2, 7, 6]
    refs = [greedy_reference(model, p, b) for p, b in zip(prompts, budgets)]
    model.setup_cache(3, 32)  # 3 rows for 7 requests: joins into a running batch and compaction both happen
    assert greedy_batch(model, prompts, budgets, max_rows=3) == refs


def test_join_into_non_consecutive_free_row(make_model, make_prompts):
    model, args = make_model("tiny")
    a, b, c = make_prompts(3, args.vocab_size, seed=3)
    refs = [greedy_reference(model, p, 6) for p in (a, b, c)]
    model.setup_cache(3, 32)
    ta = prefill(model, [a], [2])  # rows 2 and 0 run, row 1 joins later: row sets are not ranges
    tb = prefill(model, [b], [0])
    out = {"a": [int(ta)], "b": [int(tb)]}
    tok = torch.cat([ta, tb])
    for _ in range(2):
        tok = decode_step(model, tok, [2, 0])
        out["a"].append(int(tok[0]))
        out["b"].append(int(tok[1]))
    tc = prefill(model, [c], [1])
    out["c"] = [int(tc)]
    tok = torch.cat([tok, tc])
    for _ in range(3):
        tok = decode_step(model, tok, [2, 0, 1])
        for k, t in zip("abc", tok.tolist()):
            out[k].append(t)
    assert out["a"] == refs[0] and out["b"] == refs[1] and out["c"] == refs[2][:4]


def test_compact_moves_rows_and_zeroes_the_rest():
    cache = KVCache(2, 4, 8, 2, 4)
    for r in range(4):
        cache.k[:, r] = r
        cache.v[:, r] = -r
    cache.lengths[:] = torch.tensor([3, 5, 2, 7])
    cache.compact(torch.tensor([3, 1]))
    assert cache.lengths.tolist() == [7, 5, 0, 0]
    assert (cache.k[:, 0, :, :7] == 3).all() and (cache.k[:, 1, :, :5] == 1).all()
    assert (cache.v[:, 0, :, :7] == -3).all()


def test_a_wider_cache_takes_half_precision_keys_at_any_rows():
    """A bf16 model on a CPU keeps an fp32 cache: prompts and decode steps written to rows given as an index (not
    a slice), at one shared position or at several, land widened, bit for bit."""
    cache = KVCache(1, 6, 8, 2, 4)
    rows = torch.tensor([4, 1])
    k = torch.randn(2, 2, 3, 4).to(torch.bfloat16)
    cache.write_prompt(0, rows, k, -k)
    step = torch.randn(2, 2, 1, 4).to(torch.bfloat16)
    cache.append(0, rows, 3, step, -step, 4)
    cache.append(0, rows, torch.tensor([4, 5]), step, -step, 6)
    assert torch.equal(cache.k[0, 4, :, :3], k[0].float()) and torch.equal(cache.v[0, 1, :, :3], -k[1].float())
    assert torch.equal(cache.k[0, 1, :, 3], step[1, :, 0].float())
    assert torch.equal(cache.k[0, 1, :, 5], step[1, :, 0].float())


def test_export_import_rows_round_trip(make_model, make_prompts):
    model, args = make_model("tiny")
    prompts = make_prompts(2, args.vocab_size, seed=4)
    refs = [greedy_reference(model, p, 6) for p in prompts]
    model.setup_cache(2, 32)
    tok = prefill(model, prompts, [0, 1])
    exported = model.cache.export_rows([1, 0])
    assert exported["k"].shape[3] == max(len(p) for p in prompts)
    other, _ = make_model("tiny")  # a second instance with the same weights (the WAA decoder side)
    other.setup_cache(4, 32)
    other.cache.import_rows([2, 3], exported)
    tok = tok[[1, 0]]
    outs = [[t] for t in tok.tolist()]
    for _ in range(5):
        tok = decode_step(other, tok, [2, 3])
        for o, t in zip(outs, tok.tolist()):
            o.append(t)
    assert outs == [refs[1], refs[0]]


def test_fill_holes_moves_only_tail_rows_and_compact_copies_only_them():
    import torch

    from runner.kv_cache import KVCache, fill_holes

    order = fill_holes([0, 2, 3, 5, 6])  # m = 5: rows 0, 2, 3 stay; 5 and 6 fill holes 1 and 4
    assert order == [0, 5, 2, 3, 6]
    cache = KVCache(1, 8, 4, 1, 2)
    for r in range(8):
        cache.k[0, r] = r
        cache.lengths[r] = 3
    before = cache.k.clone()
    cache.compact(order)
    assert [int(cache.k[0, i, 0, 0, 0]) for i in range(5)] == order
    assert torch.equal(cache.k[0, [0, 2, 3]], before[0, [0, 2, 3]])
    assert cache.lengths.tolist() == [3] * 5 + [0] * 3


@pytest.mark.parametrize("pad", [None, (4, 9)])
def test_kv_handoff_message_round_trips_in_a_larger_receive_buffer(pad):
    """WAA's hand-off: a batch of n <= B_E rows and L <= prompt_len positions comes back exactly from the
    receive buffer of the largest batch, whether sent exactly (gloo: the message fills the buffer's front) or
    zero-padded to the buffer (NCCL: equal counts)."""
    from runner.handoff import pack_kv, unpack_kv

    g = torch.Generator().manual_seed(0)
    l, n, h, L, D, B, P = 2, 3, 2, 7, 4, 4, 9
    k, v = torch.randn(l, n, h, L, D, generator=g), torch.randn(l, n, h, L, D, generator=g)
    msg = pack_kv(k, v, pad)
    buf = torch.full((2 * l * B * h * P * D,), float("nan"))
    assert msg.numel() <= buf.numel()
    buf[:msg.numel()] = msg.reshape(-1)
    got = unpack_kv(buf, (l, n, h, L, D), pad)
    assert torch.equal(got, torch.stack([k, v]))
    if pad is not None:
        assert msg.numel() == buf.numel()
