"""Cached Arrow tables, bucketing, collation masks, stacking and the resumable sampler.

Uses a fake encoder and a fake ``prepare_batch`` with the contract's signatures so the
tests do not depend on the processor / model; one integration test uses the real ones
when they are importable.
"""

import json

import numpy as np
import pytest
from PIL import Image

from dreamprm_jax.data.batching import (
    BatchBuilder,
    BatchSpec,
    QuestionSampler,
    Sample,
    Sampler,
    choose_bucket,
    collate_meta,
    collate_train,
    pack_chain,
    power_of_two_buckets,
    stack_meta,
    stack_train,
)
from dreamprm_jax.data.dataset import build_meta_dataset, build_train_dataset
from dreamprm_jax.data.types import MetaBatch, ModelInputs, TrainBatch
from dreamprm_jax.models import qwen2_vl

D = 12  # fake patch dim
PAD = 0
IMAGE_TOKEN = 99


class FakeEncoded:
    def __init__(self, input_ids, pixel_values=None, image_grid_thw=None):
        self.input_ids, self.pixel_values, self.image_grid_thw = input_ids, pixel_values, image_grid_thw


class FakeProcessor:
    """encode(text, image): one token per character; an image of h x w px -> (h/8) x (w/8) patches."""

    max_image_side = 64

    def __init__(self):
        self._calls = 0  # private: public primitive attributes are processor settings (cache key)

    @property
    def calls(self):
        return self._calls

    def encode(self, text, image=None):
        self._calls += 1
        ids = [1 + (ord(c) % 50) for c in text]
        if image is None:
            return FakeEncoded(np.asarray(ids, np.int32))
        arr = np.asarray(image, np.float32)
        gh, gw = arr.shape[0] // 8, arr.shape[1] // 8
        patches = arr[: gh * 8, : gw * 8].reshape(gh, 8, gw, 8, 3).mean(axis=(1, 3))  # [gh, gw, 3]
        pixels = np.repeat(patches.reshape(gh * gw, 3), D // 3, axis=1) / 255.0  # [P, D]
        ids = [IMAGE_TOKEN] * (gh * gw // 4) + ids
        return FakeEncoded(np.asarray(ids, np.int32), pixels.astype(np.float32), np.asarray([[1, gh, gw]], np.int64))


def fake_prepare(input_ids, attention_mask, pixel_values=None, image_grid_thw=None, *, num_patches=None):
    B, L = input_ids.shape
    pos = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int32)
    out = ModelInputs(input_ids, attention_mask, np.broadcast_to(pos, (3, B, L)).copy())
    if pixel_values is not None:
        N = num_patches
        pv = np.zeros((N, pixel_values.shape[1]), np.float32)
        pv[: len(pixel_values)] = pixel_values
        seg = np.full((N,), -1, np.int32)
        sizes = [int(np.prod(g)) for g in image_grid_thw]
        seg[: sum(sizes)] = np.repeat(np.arange(len(sizes)), sizes)
        out = out.replace(pixel_values=pv, vision_position_ids=np.zeros((N, 2), np.int32), vision_segment_ids=seg)
    return out


def sample(n, patches=0):
    px = None if not patches else np.ones((patches, D), np.float32)
    grid = None if not patches else np.asarray([1, 2, patches // 2])
    return Sample(np.arange(1, n + 1, dtype=np.int32), px, grid)


# ----------------------------------------------------------------------------- buckets


def test_buckets():
    assert power_of_two_buckets(100, 16) == (16, 32, 64, 128)
    assert choose_bucket(33, (16, 32, 64)) == 64
    assert choose_bucket(16, (64, 16, 32)) == 16
    with pytest.raises(ValueError, match="sequence length 65 exceeds"):
        choose_bucket(65, (16, 32, 64), "sequence length")


# ----------------------------------------------------------------------------- collation


SPEC = BatchSpec(batch_size=4, seq_buckets=(8, 16, 32), patch_buckets=(16, 32, 64), pad_id=PAD, patch_dim=D)


def test_collate_train_shapes_masks_and_waste():
    rows = [sample(5, 8), sample(11), sample(3, 4)]
    batch, stats = collate_train(rows, [0.5, 1.0, 0.0], [0, 1, 1], SPEC, fake_prepare)
    assert isinstance(batch, TrainBatch) and isinstance(batch.inputs, ModelInputs)
    assert batch.inputs.branch_ids is None and batch.inputs.rope_cos is None  # unpacked rows, no tables yet
    assert batch.inputs.input_ids.shape == (4, 16) and batch.inputs.input_ids.dtype == np.int32
    assert batch.inputs.position_ids.shape == (3, 4, 16)
    assert batch.inputs.pixel_values.shape == (16, D)
    np.testing.assert_array_equal(batch.inputs.vision_segment_ids[:12], [0] * 8 + [1] * 4)
    np.testing.assert_array_equal(batch.inputs.vision_segment_ids[12:], -1)
    np.testing.assert_array_equal(batch.inputs.attention_mask.sum(1), [5, 11, 3, 1])  # dummy row: one pad token
    np.testing.assert_array_equal(batch.sample_mask, [1, 1, 1, 0])
    np.testing.assert_array_equal(batch.labels, np.asarray([0.5, 1.0, 0.0, 0.0], np.float32))
    np.testing.assert_array_equal(batch.domain_ids, [0, 1, 1, 0])
    assert (stats["seq_bucket"], stats["patch_bucket"]) == (16, 16)
    assert stats["token_waste"] == pytest.approx(1 - 19 / 64, abs=1e-12)
    assert stats["patch_waste"] == pytest.approx(1 - 12 / 16, abs=1e-12)


def test_left_padding():
    spec = BatchSpec(batch_size=2, seq_buckets=(8,), pad_id=PAD, padding_side="left")
    batch, _ = collate_train([sample(3)], [1.0], [0], spec, fake_prepare)
    np.testing.assert_array_equal(batch.inputs.input_ids[0], [0, 0, 0, 0, 0, 1, 2, 3])
    np.testing.assert_array_equal(batch.inputs.attention_mask[0], [0, 0, 0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(batch.inputs.attention_mask[1], [0] * 7 + [1])
    assert not batch.inputs.has_images  # text-only spec


def test_collate_errors():
    with pytest.raises(ValueError, match="exceeds the largest bucket"):
        collate_train([sample(40)], [1.0], [0], SPEC, fake_prepare)
    with pytest.raises(ValueError, match="at most 4"):
        collate_train([sample(2)] * 5, [1.0] * 5, [0] * 5, SPEC, fake_prepare)
    with pytest.raises(ValueError, match="patch_buckets is None"):
        collate_train([sample(2, 4)], [1.0], [0], BatchSpec(2, (8,)), fake_prepare)


def test_collate_meta_chain_major_masks():
    spec = BatchSpec(batch_size=3, seq_buckets=(16,), patch_buckets=(64,), pad_id=PAD, patch_dim=D, max_steps=3)
    chains = [[sample(4, 4), sample(6, 4), sample(8, 4)], [sample(5)]]
    batch, stats = collate_meta(chains, [1.0, 0.0], spec, fake_prepare)
    assert isinstance(batch, MetaBatch)
    M, S = 3, 3
    assert batch.inputs.input_ids.shape == (M * S, 16)
    np.testing.assert_array_equal(batch.step_mask, [[1, 1, 1], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(batch.chain_mask, [1, 1, 0])
    np.testing.assert_array_equal(batch.labels, np.asarray([1, 0, 0], np.float32))
    # chain-major: row m * S + s is step s + 1 of chain m
    np.testing.assert_array_equal(batch.inputs.attention_mask.sum(1), [4, 6, 8, 5, 1, 1, 1, 1, 1])
    assert stats["num_steps"] == 3 and batch.inputs.pixel_values.shape == (64, D)
    with pytest.raises(ValueError, match="max_steps"):
        collate_meta([[sample(2)] * 4], [1.0], spec, fake_prepare)
    # without question ids every chain is its own question; dummy chains are -1
    np.testing.assert_array_equal(batch.question_index, [0, 1, -1])
    assert batch.question_index.dtype == np.int32


def test_collate_meta_groups_chains_by_question():
    """Questions x candidates laid out chain-major: [M] question_index beside [M] labels and
    chain_mask, [M, S] step_mask; the same static shapes packed or not, stacked or not."""
    spec = BatchSpec(batch_size=6, seq_buckets=(16,), pad_id=PAD, max_steps=2)
    chains = [[sample(3), sample(5)], [sample(4)], [sample(2), sample(6)], [sample(3)]]  # questions 7, 7, 2, 2
    batch, _ = collate_meta(chains, [1.0, 0.0, 0.0, 1.0], spec, fake_prepare, question_ids=[7, 7, 2, 2])
    np.testing.assert_array_equal(batch.question_index, [7, 7, 2, 2, -1, -1])
    np.testing.assert_array_equal(batch.chain_mask, [1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(batch.labels, [1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(batch.step_mask, [[1, 1], [1, 0], [1, 1], [1, 0], [0, 0], [0, 0]])
    assert batch.inputs.input_ids.shape == (12, 16)
    packed, _ = collate_meta(chains, [1.0, 0.0, 0.0, 1.0], BatchSpec(**{**spec.__dict__, "pack_chains": True}),
                             fake_prepare, question_ids=[7, 7, 2, 2])
    np.testing.assert_array_equal(packed.question_index, batch.question_index)
    assert packed.inputs.input_ids.shape == (6, 16) and packed.inputs.score_index.shape == (6, 2)
    stacked, _ = stack_meta([(chains, [1.0, 0.0, 0.0, 1.0], [7, 7, 2, 2]), (chains[:1], [1.0], [3])], spec,
                            fake_prepare)
    np.testing.assert_array_equal(stacked.question_index, [[7, 7, 2, 2, -1, -1], [3, -1, -1, -1, -1, -1]])
    assert stacked.step_mask.shape == (2, 6, 2) and stacked.chain_mask.shape == (2, 6)
    with pytest.raises(ValueError, match="one question id per chain"):
        collate_meta(chains, [1.0] * 4, spec, fake_prepare, question_ids=[0, 1])


def _prefix_chain(bodies, patches=4, head=(IMAGE_TOKEN, IMAGE_TOKEN, 10, 11), suffix=(90, 91, 92)):
    """A chain's step prefixes: ``head + bodies[k] + suffix`` (one shared image)."""
    px = np.ones((patches, D), np.float32)
    grid = np.asarray([1, 2, patches // 2])
    return [Sample(np.asarray(list(head) + list(b) + list(suffix), np.int32), px, grid) for b in bodies]


def _visible_prefix(batch, m, s):
    """Tokens and positions that the score position of step s of packed row m attends to."""
    q = batch.inputs.score_index[m, s]
    branch, mask = batch.inputs.branch_ids[m], batch.inputs.attention_mask[m]
    keys = [j for j in range(q + 1) if mask[j] and (branch[j] == 0 or branch[j] == branch[q])]
    return batch.inputs.input_ids[m, keys], batch.inputs.position_ids[0, m, keys]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_packed_meta_rows_show_each_prefix_exactly(padding_side):
    """Packing: each step's score position sees exactly its own prefix's tokens, at the positions
    they have in the prefix alone (0..n-1 with fake_prepare); one image per chain; same masks."""
    bodies = [[20, 21], [20, 21, 30], [20, 21, 30, 31, 32]]
    divergent = [[40], [41, 42]]  # the tokenizer merged step 1's end differently
    chains = [_prefix_chain(bodies), _prefix_chain(divergent)]
    spec = BatchSpec(batch_size=3, seq_buckets=(32,), patch_buckets=(16,), pad_id=PAD, patch_dim=D, max_steps=3,
                     padding_side=padding_side, pack_chains=True)
    batch, _ = collate_meta(chains, [1.0, 0.0], spec, fake_prepare)
    unpacked, _ = collate_meta(chains, [1.0, 0.0], BatchSpec(**{**spec.__dict__, "pack_chains": False,
                                                                "patch_buckets": (64,)}), fake_prepare)
    assert batch.inputs.input_ids.shape == (3, 32) and batch.inputs.score_index.shape == (3, 3)
    assert batch.inputs.branch_ids.shape == (3, 32) and batch.inputs.pixel_values.shape == (16, D)
    for key in ("step_mask", "labels", "chain_mask"):
        np.testing.assert_array_equal(getattr(batch, key), getattr(unpacked, key))
    for m, chain in enumerate(chains):
        for s, row in enumerate(chain):
            ids, pos = _visible_prefix(batch, m, s)
            np.testing.assert_array_equal(ids, row.input_ids)
            np.testing.assert_array_equal(pos, np.arange(len(row.input_ids)))
    stacked, _ = stack_meta([(chains, [1.0, 0.0])] * 2, BatchSpec(**{**spec.__dict__, "seq_buckets": (16, 32)}),
                            fake_prepare)  # packed rows (18 tokens) need the 32 bucket, single prefixes fit 16
    assert stacked.inputs.input_ids.shape == (2, 3, 32) and stacked.inputs.score_index.shape == (2, 3, 3)
    packed, branch, score_pos = pack_chain(chains[0])
    assert len(packed.input_ids) == len(chains[0][-1].input_ids) + 2 * 3  # trunk + two 3-token tails
    np.testing.assert_array_equal(branch[score_pos[:2]], [1, 2])
    with pytest.raises(ValueError, match="different images"):
        pack_chain([chains[0][0], Sample(chains[0][1].input_ids)], "chain 7")


def test_stacking_uses_one_bucket():
    groups = [([sample(3)], [1.0], [0]), ([sample(20, 40), sample(2)], [0.0, 1.0], [1, 0])]
    stacked, stats = stack_train(groups, SPEC, fake_prepare)
    assert stacked.inputs.input_ids.shape == (2, 4, 32)
    assert stacked.inputs.position_ids.shape == (2, 3, 4, 32)
    assert stacked.inputs.pixel_values.shape == (2, 64, D)  # the text-only batch gets the image slots too
    np.testing.assert_array_equal(stacked.sample_mask, [[1, 0, 0, 0], [1, 1, 0, 0]])
    assert stats["seq_bucket"] == 32 and stats["patch_bucket"] == 64
    spec = BatchSpec(batch_size=2, seq_buckets=(8, 16), patch_buckets=(64,), patch_dim=D)  # S from step_buckets
    mstacked, mstats = stack_meta([([[sample(3)] * 3], [1.0]), ([[sample(9)]], [0.0])], spec, fake_prepare)
    assert mstats["num_steps"] == 4 and mstacked.step_mask.shape == (2, 2, 4)
    assert mstacked.inputs.input_ids.shape == (2, 8, 16)


# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("mode", ["shuffle", "stratified", "balanced"])
def test_sampler_resume_equality(mode):
    groups = [0] * 7 + [1] * 3 + [2] * 2
    a = Sampler(12, 5, seed=3, mode=mode, groups=groups)
    for _ in range(4):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))  # plain ints survive a checkpoint round trip
    assert set(state) == {"epoch", "position", "seed"}
    expected = [a.next() for _ in range(6)]
    b = Sampler(12, 5, seed=0, mode=mode, groups=groups)
    b.load_state_dict(state)
    for want in expected:
        np.testing.assert_array_equal(b.next(), want)


def test_sampler_epochs_cover_everything():
    s = Sampler(10, 4, seed=1)
    seen = np.concatenate([s.next() for _ in range(5)])  # 20 = two epochs exactly
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:]) == list(range(10))
    assert not np.array_equal(seen[:10], seen[10:])
    assert s.state_dict() == {"epoch": 2, "position": 0, "seed": 1}
    np.testing.assert_array_equal(Sampler(10, 4, seed=1).order(1), s.order(1))


def test_question_sampler_draws_whole_questions_and_resumes():
    chain_questions = np.array([0, 0, 0, 1, 1, 2, 2, 2, 3, 4, 4])  # 5 questions, at most 3 chains
    sampler = QuestionSampler(chain_questions, batch_size=7, seed=3)
    assert sampler.num_questions == 5 and sampler.questions_per_batch == 2 and sampler.seed == 3
    seen = []
    for _ in range(5):  # two epochs of 5 questions, 2 per draw
        chains = sampler.next()
        assert len(chains) <= 7
        questions = chain_questions[chains]
        for q in np.unique(questions):  # every chain of each drawn question, contiguous
            np.testing.assert_array_equal(np.sort(chains[questions == q]), np.flatnonzero(chain_questions == q))
        seen.extend(dict.fromkeys(questions.tolist()))
    assert sorted(seen[:5]) == [0, 1, 2, 3, 4] and sorted(seen[5:10]) == [0, 1, 2, 3, 4]
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(3)]
    again = QuestionSampler(chain_questions, batch_size=7, seed=3)
    again.load_state_dict(state)
    for e in expected:
        np.testing.assert_array_equal(again.next(), e)
    with pytest.raises(ValueError, match="more than the 2 chains"):
        QuestionSampler(chain_questions, batch_size=2)


def test_sampler_domain_modes():
    groups = np.asarray([0] * 8 + [1] * 2)
    strat = Sampler(10, 5, seed=0, mode="stratified", groups=groups).order(0)
    assert sorted(strat) == list(range(10))
    assert (groups[strat[:5]] == 1).sum() == 1  # proportional: 1 of 5 from the 2-item domain
    bal = Sampler(10, 4, seed=0, mode="balanced", groups=groups).order(0)
    assert len(bal) == 16
    for k in range(0, 16, 2):  # every consecutive pair holds one item of each domain
        assert sorted(groups[bal[k: k + 2]]) == [0, 1]
    with pytest.raises(ValueError, match="groups"):
        Sampler(10, 4, mode="balanced")


# ----------------------------------------------------------------------------- tables + cache


@pytest.fixture
def data_dir(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    train = [
        {"input": "Q1", "add": "Step 1: x", "image_path": "a.png", "dataset": "math", "accuracy": 0.25, "id": "q1", "sid": 1},
        {"input": "Q1", "add": "Step 1: x Step 2: y", "image_path": "a.png", "dataset": "math", "accuracy": 0.5,
         "id": "q1", "sid": 2},
        {"input": "Q2 longer question", "add": "Step 1: z", "image_path": "b.png", "dataset": "sci", "accuracy": 1.0},
        {"input": "Q3", "add": "Step 1: w", "image_path": None, "dataset": "sci", "accuracy": 0.0},
    ]
    (tmp_path / "train.json").write_text(json.dumps(train))
    meta = [
        {"input": "Q Step 1: a Step 2: bb Step 3: c Final answer: d", "image_path": "a.png", "true_false": True},
        {"input": "Q Step 1: a Final answer: d", "image_path": None, "true_false": False},
    ]
    (tmp_path / "meta.jsonl").write_text("\n".join(json.dumps(m) for m in meta))
    return tmp_path


def test_train_table_and_cache_hit(data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    proc = FakeProcessor()
    data = build_train_dataset(data_dir / "train.json", proc, cache)
    assert not data.from_cache and proc.calls == 4
    assert data.domains == ("math", "sci") and data.info["num_images"] == 2 and data.info["patch_dim"] == D
    np.testing.assert_array_equal(data.samples["image_index"], [0, 0, 1, -1])
    np.testing.assert_array_equal(data.samples["num_patches"], [16, 16, 8, 0])
    np.testing.assert_array_equal(data.samples["domain_id"], [0, 0, 1, 1])
    np.testing.assert_allclose(data.samples["label"], [0.25, 0.5, 1.0, 0.0], rtol=0, atol=0)

    again = build_train_dataset(data_dir / "train.json", proc, cache)
    assert again.from_cache and proc.calls == 4  # second run: the encoder is not called
    assert again.path == data.path

    # a change to an image's bytes invalidates the key
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(data_dir / "a.png")
    third = build_train_dataset(data_dir / "train.json", proc, cache)
    assert not third.from_cache and proc.calls == 8 and third.path != data.path

    builder = BatchBuilder(third, BatchSpec(4, (32, 64), (32, 64), pad_id=PAD), fake_prepare)
    batch, stats = builder.train_batch([3, 0, 2])
    assert batch.inputs.input_ids.shape == (4, 32) and batch.inputs.pixel_values.shape == (32, D)
    np.testing.assert_array_equal(batch.sample_mask, [1, 1, 1, 0])
    np.testing.assert_array_equal(batch.domain_ids, [1, 0, 1, 0])
    assert stats["patch_waste"] == pytest.approx(1 - 24 / 32, abs=1e-12)
    enc = FakeProcessor().encode("Q1\n\nStep 1: x", Image.open(data_dir / "a.png").convert("RGB"))
    np.testing.assert_array_equal(batch.inputs.input_ids[1, : len(enc.input_ids)], enc.input_ids)
    np.testing.assert_allclose(batch.inputs.pixel_values[:16], enc.pixel_values, rtol=0, atol=1e-7)
    stacked, _ = builder.stacked_train([[0, 1], [2, 3]])
    assert stacked.inputs.input_ids.shape == (2, 4, 32)


def test_seen_image_is_not_preprocessed_again(data_dir, tmp_path_factory):
    """A processor with ``encode_text`` gets each distinct image once; the table is unchanged."""

    class WithText(FakeProcessor):
        text_calls = 0

        def encode_text(self, text, image_grid_thw=None):
            WithText.text_calls += 1
            ids = [1 + (ord(c) % 50) for c in text]
            n = 0 if image_grid_thw is None else int(np.prod(image_grid_thw)) // 4
            return np.asarray([IMAGE_TOKEN] * n + ids, np.int32)

    plain = build_train_dataset(data_dir / "train.json", FakeProcessor(), tmp_path_factory.mktemp("plain"))
    proc = WithText()
    fast = build_train_dataset(data_dir / "train.json", proc, tmp_path_factory.mktemp("fast"))
    assert proc.calls == 3 and WithText.text_calls == 1  # records: image a twice, image b, no image
    for column in plain.samples.column_names:
        for x, y in zip(plain.samples[column], fast.samples[column]):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_meta_table_and_batches(data_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    proc = FakeProcessor()
    data = build_meta_dataset(data_dir / "meta.jsonl", proc, cache)
    assert data.info["num_chains"] == 2 and data.info["max_steps"] == 3 and proc.calls == 4
    np.testing.assert_array_equal(data.chain_rows(), [[0, 3], [3, 1]])
    np.testing.assert_array_equal(data.samples["step"], [1, 2, 3, 1])
    assert build_meta_dataset(data_dir / "meta.jsonl", proc, cache).from_cache and proc.calls == 4
    builder = BatchBuilder(data, BatchSpec(2, (64,), (64,), pad_id=PAD, max_steps=4), fake_prepare)
    batch, _ = builder.meta_batch([1, 0])
    np.testing.assert_array_equal(batch.step_mask, [[1, 0, 0, 0], [1, 1, 1, 0]])
    np.testing.assert_array_equal(batch.labels, np.asarray([0, 1], np.float32))
    lengths = batch.inputs.attention_mask.sum(1)
    assert lengths[4] < lengths[5] < lengths[6]  # prefixes of chain 0 grow
    stacked, _ = builder.stacked_meta([[0], [1, 0]])
    assert stacked.step_mask.shape == (2, 2, 4)
    np.testing.assert_array_equal(data.chain_questions(), [0, 1])  # different images: two questions
    np.testing.assert_array_equal(batch.question_index, [1, 0])


def test_meta_table_groups_chains_by_question_id_or_question_and_image(data_dir, tmp_path_factory):
    meta = [
        {"input": "Q1\n\nStep 1: a Final answer: 1", "image_path": "a.png", "true_false": True, "question_id": "x"},
        {"input": "Q1 again\n\nStep 1: b Final answer: 2", "image_path": "a.png", "true_false": False,
         "question_id": "x"},
        {"input": "Q2\n\nStep 1: c Final answer: 3", "image_path": "b.png", "true_false": True},
        {"input": "Q2\n\nStep 1: d Step 2: e Final answer: 4", "image_path": "b.png", "true_false": False},
        {"input": "Q2\n\nStep 1: f Final answer: 3", "image_path": None, "true_false": True},  # another image
        {"input": "Q1\n\nStep 1: g Final answer: 1", "image_path": "a.png", "true_false": True, "question_id": 5},
    ]
    (data_dir / "grouped.json").write_text(json.dumps(meta))
    data = build_meta_dataset(data_dir / "grouped.json", FakeProcessor(), tmp_path_factory.mktemp("cache"))
    np.testing.assert_array_equal(data.chain_questions(), [0, 0, 1, 1, 2, 3])
    assert data.info["num_questions"] == 4
    builder = BatchBuilder(data, BatchSpec(5, (64,), (64,), pad_id=PAD, max_steps=2), fake_prepare)
    sampler = QuestionSampler(data.chain_questions(), batch_size=5, seed=0)
    batch, _ = builder.meta_batch(sampler.next())
    assert batch.question_index.shape == batch.labels.shape == batch.chain_mask.shape == (5,)
    real = batch.chain_mask > 0
    assert 2 <= real.sum() <= 4 and np.all(batch.question_index[~real] == -1)
    questions = batch.question_index[real]
    assert len(set(questions.tolist())) == 2  # two whole questions of <= 2 chains
    for q in set(questions.tolist()):
        assert (questions == q).sum() == (data.chain_questions() == q).sum()



def test_text_only_table_and_encoder_error(tmp_path):
    rec = {"input": "Q", "add": "Step 1: a", "image_path": None, "dataset": "d", "accuracy": 0.5}
    (tmp_path / "t.json").write_text(json.dumps([rec, dict(rec, accuracy=1.0)]))
    data = build_train_dataset(tmp_path / "t.json", FakeProcessor(), tmp_path / "cache")
    assert len(data.images) == 0 and len(data.samples) == 2
    builder = BatchBuilder(data, BatchSpec(2, (16,), pad_id=PAD), fake_prepare)
    batch, _ = builder.train_batch([1, 0])
    np.testing.assert_array_equal(batch.labels, np.asarray([1.0, 0.5], np.float32))

    class Broken(FakeProcessor):
        def encode(self, text, image=None):
            raise ValueError("encoder failed on purpose")

    with pytest.raises(ValueError, match="on purpose"):  # the encoder's own error, not datasets' wrapper
        build_train_dataset(tmp_path / "t.json", Broken(), tmp_path / "cache2")
    assert list((tmp_path / "cache2").iterdir()) == []  # no half-written cache left behind

# ----------------------------------------------------------------------------- integration (real processor + model)


def _tiny_model_and_processor(tok_dir, texts):
    """A tokenizer learnt offline from ``texts``, the tiny Qwen2-VL config with its special ids, and
    a processor with small image limits: ``(config, processor, special_token_ids)``."""
    from dreamprm_jax.data.processor import Processor, build_offline_tokenizer
    from dreamprm_jax.models import qwen2_vl

    build_offline_tokenizer(list(texts) * 5, 300, tok_dir)
    sp = Processor.from_directory(tok_dir).special_token_ids
    config = qwen2_vl.tiny(vocab_size=max(256, sp.vocab_size), image_token_id=sp.image_pad,
                           video_token_id=sp.video_pad, vision_start_token_id=sp.vision_start,
                           vision_end_token_id=sp.vision_end)
    processor = Processor.from_directory(tok_dir, vision=config.vision, max_image_side=32, min_pixels=64,
                                         max_pixels=32 * 32)
    return config, processor, sp


def test_integration_real_processor_and_model(data_dir, tmp_path_factory):
    """Real Processor -> cached tables -> BatchBuilder -> qwen2_vl.prepare_batch -> forward.

    A row's logits at its real positions must not depend on the rest of the batch: the
    sample beside other samples / images (row 1) and alone with dummy rows (row 0) agree
    (atol 2e-5, float32), with right padding, dummy rows and padded patch slots.
    """
    import jax

    from dreamprm_jax.models import qwen2_vl

    from dreamprm_jax.data.batching import model_prepare_fn

    config, processor, sp = _tiny_model_and_processor(
        tmp_path_factory.mktemp("tok"), ["Q1 Step 1: x Step 2: y", "Q2 longer question Step 1: z w"])
    data = build_train_dataset(data_dir / "train.json", processor, tmp_path_factory.mktemp("cache"))
    assert data.info["patch_dim"] == config.vision.patch_dim
    spec = BatchSpec(4, power_of_two_buckets(512, 64), power_of_two_buckets(1024, 16), pad_id=sp.pad)
    builder = BatchBuilder(data, spec, model_prepare_fn(config))
    batch, stats = builder.train_batch([2, 0, 3])  # two images + a text-only row + a dummy row
    assert batch.inputs.pixel_values.shape == (stats["patch_bucket"], config.vision.patch_dim)
    np.testing.assert_array_equal(batch.sample_mask, [1, 1, 1, 0])

    params = qwen2_vl.init_params(config, jax.random.PRNGKey(0))
    forward = jax.jit(qwen2_vl.forward, static_argnums=0)
    full = np.asarray(forward(config, params, batch.inputs))
    assert np.isfinite(full).all()  # dummy row included
    # the same sample alone in row 0 (other rows dummy), same buckets -> same compiled function
    rows, _ = builder._rows([0])
    alone_batch, _ = collate_train(rows, [0.0], [0], builder.spec, model_prepare_fn(config),
                                   seq_bucket=stats["seq_bucket"], patch_bucket=stats["patch_bucket"])
    alone = np.asarray(forward(config, params, alone_batch.inputs))
    n = len(rows[0].input_ids)
    np.testing.assert_allclose(full[1, :n], alone[0, :n], rtol=0, atol=2e-5)


def test_packed_meta_scores_equal_one_row_per_step(data_dir, tmp_path_factory):
    """prm.score on a packed meta batch == on one row per step prefix (real processor, tiny
    Qwen2-VL with an image, float32; atol 1e-5 on the logits, the summation order differs)."""
    import dataclasses

    import jax

    from dreamprm_jax.data.batching import model_prepare_fn
    from dreamprm_jax.models import prm

    config, processor, sp = _tiny_model_and_processor(
        tmp_path_factory.mktemp("tok_pack"), ["Q Step 1: a Step 2: bb Step 3: c Final answer: d"])
    data = build_meta_dataset(data_dir / "meta.jsonl", processor, tmp_path_factory.mktemp("cache_pack"))
    spec = BatchSpec(3, power_of_two_buckets(512, 64), power_of_two_buckets(1024, 16), pad_id=sp.pad, max_steps=4)
    plain = BatchBuilder(data, spec, model_prepare_fn(config))
    packed = BatchBuilder(data, dataclasses.replace(spec, pack_chains=True), model_prepare_fn(config))
    params = prm.init(config, jax.random.PRNGKey(0))
    a, _ = plain.meta_batch([0, 1])
    b, stats = packed.meta_batch([0, 1])
    assert b.inputs.input_ids.shape[0] == 3 and a.inputs.input_ids.shape[0] == 3 * 4
    assert b.inputs.pixel_values.shape[0] < a.inputs.pixel_values.shape[0]  # the image once per chain
    za = np.asarray(prm.score(config, params, a.inputs)[1])  # [M * S]
    zb = np.asarray(prm.score(config, params, b.inputs)[1])  # [M * S]
    real = a.step_mask.reshape(-1) > 0
    np.testing.assert_allclose(zb[real], za[real], rtol=0, atol=1e-5)
