"""Training and evaluation through the suite's own trainer, against a bare loop.

* One training step per method at batch 16 (forward, backward, gradient clipping, AdamW step,
  scheduler step): the trainer's ``_train_epoch`` over exactly 16 t15 training tweets, so
  collation, image loading (from the disk cache) and the per-step hooks are in the time.
  ``MNER_BENCH_ROUNDS - 1`` rounds (2 by default) without warm-up: a ``bga`` step takes half
  a minute on a loaded 2-core CPU, and no target depends on these.
* The suite's overhead: a ``bertcrf`` training epoch (``_train_epoch`` on 32 t15 training
  tweets, 2 steps of 16, tracking off) and an evaluation (``predict_split`` on 64 t15 dev
  tweets, batch 32), ``MNER_BENCH_ROUNDS + 2`` rounds each (5 by default) after a warm-up,
  against a bare loop written here for the purpose: transformers' ``AutoModel`` + dropout + a
  linear layer + pytorch-crf, AdamW with gradient clipping and a linear schedule, the same
  weights, the same tweets in the same batches (checked sub-token for sub-token).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchcrf import CRF

from mner_bench.encoders import resolve_model_path
from mner_bench.labels import TAG_TO_ID, TAGS, decode_tags
from mner_bench.training import (
    RunContext,
    _train_epoch,
    autocast_dtype,
    encode_split,
    make_optimizer,
    predict_split,
)

from .common import METHODS, ROUNDS, build, config, heavy, make_batcher, sync

TRAIN_TWEETS, EVAL_TWEETS = 32, 64
#: rounds of the mner-bench vs bare comparisons (their ratio has a 10% bound: more rounds)
PAIR_ROUNDS = ROUNDS + 2
#: rounds of the per-method training steps
STEP_ROUNDS = max(1, ROUNDS - 1)
TRAIN_BATCH, EVAL_BATCH = 16, 32
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- one step per method


@pytest.mark.benchmark(group="training step: batch 16")
@pytest.mark.parametrize("method", METHODS)
def test_train_step(benchmark, method, device, registry, t15, image_dir, image_cache, tmp_path):
    cfg = config(registry, method, device)
    model = build(registry, cfg, device)
    batcher = make_batcher(model, image_dir, image_cache)
    split = encode_split(t15["train"][:TRAIN_BATCH], model, cfg.data.max_length)
    opt, sched = make_optimizer(model, cfg, total_steps=1000)
    ctx = RunContext(cfg, tmp_path, "benchmark", registry)
    amp = autocast_dtype(cfg.train.precision, device)
    counts = model.parameter_counts()
    benchmark.extra_info.update({
        "key": f"train-step/{method}/{device.type}", "method": method, "batch_size": TRAIN_BATCH,
        "device": device.type, "autocast": str(amp) if amp else "fp32", "images": batcher.image_provider is not None,
        "params_trainable": counts["params_trainable"],
    })

    def step():
        metrics = _train_epoch(model, batcher, split, cfg, device, amp, opt, sched, None, ctx, 1)
        sync(device)
        return metrics

    metrics = heavy(benchmark, step, rounds=STEP_ROUNDS, warmup=False)
    assert torch.isfinite(torch.tensor(metrics["train_loss"]))


# --------------------------------------------------------------------------- the bare loop


class BareBertCrf(nn.Module):
    """BERT-CRF written directly on transformers and pytorch-crf: the model ``bertcrf`` builds
    (encoder, dropout 0.1 on its last layer, first sub-token of each word, linear, CRF)."""

    def __init__(self, path: str, num_tags: int, dropout: float = 0.1):
        super().__init__()
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(path)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(self.encoder.config.hidden_size, num_tags)
        self.crf = CRF(num_tags, batch_first=True)

    def emissions(self, input_ids, attention_mask, word_starts):
        h = self.dropout(self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state)
        words = h.gather(1, word_starts.unsqueeze(-1).expand(-1, -1, h.size(-1)))
        return self.proj(words)


def bare_encode(tokenizer, tweets, max_length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """(sub-token ids, first sub-token of each word, tag ids) per tweet, with the tokenizer's own
    word alignment (done once, as the suite tokenises each split once)."""
    items = []
    for tw in tweets:
        enc = tokenizer(tw.tokens, is_split_into_words=True, truncation=True, max_length=max_length)
        starts, seen = [], set()
        for pos, word in enumerate(enc.word_ids()):
            if word is not None and word not in seen:
                seen.add(word)
                starts.append(pos)
        items.append((enc["input_ids"], starts, [TAG_TO_ID[t] for t in tw.tags]))
    return items


def bare_collate(items, pad_id: int):
    B = len(items)
    L = max(len(ids) for ids, _, _ in items)
    W = max(len(tags) for _, _, tags in items)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    attention = torch.zeros((B, L), dtype=torch.long)
    starts = torch.zeros((B, W), dtype=torch.long)
    mask = torch.zeros((B, W), dtype=torch.bool)
    tags = torch.zeros((B, W), dtype=torch.long)
    for b, (ids, st, tg) in enumerate(items):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        attention[b, : len(ids)] = 1
        starts[b, : len(st)] = torch.tensor(st)
        mask[b, : len(st)] = True
        tags[b, : len(tg)] = torch.tensor(tg)
    return input_ids, attention, starts, mask, tags


def bare_train_epoch(model: BareBertCrf, items, opt, sched, pad_id: int) -> float:
    model.train()
    total = 0.0
    for i in range(0, len(items), TRAIN_BATCH):
        input_ids, attention, starts, mask, tags = bare_collate(items[i : i + TRAIN_BATCH], pad_id)
        loss = -model.crf(model.emissions(input_ids, attention, starts), tags, mask=mask, reduction="mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        total += float(loss.detach())
    return total


@torch.no_grad()
def bare_predict(model: BareBertCrf, items, pad_id: int) -> list[list[str]]:
    model.eval()
    out = []
    for i in range(0, len(items), EVAL_BATCH):
        batch = items[i : i + EVAL_BATCH]
        input_ids, attention, starts, mask, _ = bare_collate(batch, pad_id)
        best = model.crf.decode(model.emissions(input_ids, attention, starts), mask=mask)
        for seq, (_, _, tags) in zip(best, batch, strict=True):
            out.append(decode_tags(seq + [0] * (len(tags) - len(seq))))
    return out


# --------------------------------------------------------------------------- mner-bench vs bare


@pytest.fixture(scope="module")
def pair(registry, t15, tmp_path_factory):
    """The suite's ``bertcrf`` (default config, CPU) and the bare model with the same weights,
    the same tweets encoded by each, and each one's optimizer."""
    from transformers import get_linear_schedule_with_warmup

    cfg = config(registry, "bertcrf", CPU)
    model = build(registry, cfg, CPU)
    batcher = make_batcher(model, None, None)
    train = encode_split(t15["train"][:TRAIN_TWEETS], model, cfg.data.max_length)
    dev = encode_split(t15["dev"][:EVAL_TWEETS], model, cfg.data.max_length)
    opt, sched = make_optimizer(model, cfg, total_steps=1000)

    bare = BareBertCrf(resolve_model_path(cfg.text_encoder.name), len(TAGS), cfg.text_encoder.dropout)
    bare.encoder.load_state_dict(model.text_encoder.model.state_dict())
    bare.proj.load_state_dict(model.decoder.proj.state_dict())
    bare.crf.load_state_dict(model.decoder.crf.state_dict())
    tokenizer = model.text_encoder.tokenizer
    bare_train = bare_encode(tokenizer, train.tweets, cfg.data.max_length)
    bare_dev = bare_encode(tokenizer, dev.tweets, cfg.data.max_length)
    for mine, theirs in ((train, bare_train), (dev, bare_dev)):  # the same batches
        assert [e.input_ids for e in mine.encoded] == [ids for ids, _, _ in theirs]
        assert [e.word_starts for e in mine.encoded] == [st for _, st, _ in theirs]
    bare_opt = torch.optim.AdamW(bare.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    bare_sched = get_linear_schedule_with_warmup(bare_opt, 1, 1000)
    ctx = RunContext(cfg, tmp_path_factory.mktemp("run"), "benchmark", registry)
    yield {"cfg": cfg, "model": model, "batcher": batcher, "train": train, "dev": dev, "opt": opt, "sched": sched,
           "ctx": ctx, "bare": bare, "bare_train": bare_train, "bare_dev": bare_dev, "bare_opt": bare_opt,
           "bare_sched": bare_sched, "pad_id": tokenizer.pad_token_id}


EPOCH_INFO = {"tweets": TRAIN_TWEETS, "batch_size": TRAIN_BATCH, "steps": TRAIN_TWEETS // TRAIN_BATCH}
EVAL_INFO = {"tweets": EVAL_TWEETS, "batch_size": EVAL_BATCH}


@pytest.mark.benchmark(group="bertcrf training epoch (32 tweets): mner-bench vs bare loop")
def test_train_epoch_mner_bench(benchmark, pair):
    p = pair
    benchmark.extra_info.update({"key": "epoch/train/mner-bench", **EPOCH_INFO})
    heavy(benchmark, lambda: _train_epoch(p["model"], p["batcher"], p["train"], p["cfg"], CPU, None, p["opt"],
                                          p["sched"], None, p["ctx"], 1), rounds=PAIR_ROUNDS)


@pytest.mark.benchmark(group="bertcrf training epoch (32 tweets): mner-bench vs bare loop")
def test_train_epoch_bare(benchmark, pair):
    p = pair
    benchmark.extra_info.update({"key": "epoch/train/bare", **EPOCH_INFO})
    heavy(benchmark, lambda: bare_train_epoch(p["bare"], p["bare_train"], p["bare_opt"], p["bare_sched"], p["pad_id"]),
          rounds=PAIR_ROUNDS)


@pytest.mark.benchmark(group="bertcrf evaluation (64 dev tweets): mner-bench vs bare loop")
def test_eval_mner_bench(benchmark, pair):
    p = pair
    benchmark.extra_info.update({"key": "epoch/eval/mner-bench", **EVAL_INFO})
    out = heavy(benchmark, lambda: predict_split(p["model"], p["batcher"], p["dev"], EVAL_BATCH, CPU, None), rounds=PAIR_ROUNDS)
    assert [len(x) for x in out] == [len(t.tokens) for t in p["dev"].tweets]


@pytest.mark.benchmark(group="bertcrf evaluation (64 dev tweets): mner-bench vs bare loop")
def test_eval_bare(benchmark, pair):
    p = pair
    benchmark.extra_info.update({"key": "epoch/eval/bare", **EVAL_INFO})
    out = heavy(benchmark, lambda: bare_predict(p["bare"], p["bare_dev"], p["pad_id"]), rounds=PAIR_ROUNDS)
    assert [len(x) for x in out] == [len(t.tokens) for t in p["dev"].tweets]
