from pathlib import Path

import pytest
import torch

from trainer.data import (
    Corpus,
    CorpusError,
    CorpusSettings,
    TokenBlocks,
    default_corpus_root,
    evaluate_loss,
    heldout_batches,
    is_heldout,
    load_corpus,
    read_documents,
)
from trainer.model import ModelConfig, build_model
from trainer.tokenizer import BOS_ID, EOS_ID

STDLIB_SETTINGS = CorpusSettings(max_total_bytes=512 * 1024, document_chunk_bytes=16 * 1024)


@pytest.fixture(scope="module")
def stdlib_corpus() -> Corpus:
    return load_corpus(STDLIB_SETTINGS)


def test_default_corpus_is_the_stdlib_and_is_the_same_on_every_load(
    stdlib_corpus: Corpus,
) -> None:
    again = load_corpus(STDLIB_SETTINGS)
    assert again.train_ids == stdlib_corpus.train_ids
    assert torch.equal(again.train_tokens, stdlib_corpus.train_tokens)
    assert torch.equal(again.heldout_tokens, stdlib_corpus.heldout_tokens)
    root = default_corpus_root()
    ids = stdlib_corpus.train_ids + stdlib_corpus.heldout_ids
    files = {doc.rsplit("#", 1)[0] for doc in ids}
    assert len(files) > 5 and all(f.endswith(".py") and (root / f).is_file() for f in files)
    assert "site-packages" not in "".join(files)
    total_text = stdlib_corpus.train_tokens.numel() + stdlib_corpus.heldout_tokens.numel()
    docs = len(stdlib_corpus.train_ids) + len(stdlib_corpus.heldout_ids)
    assert total_text - 2 * docs <= STDLIB_SETTINGS.max_total_bytes  # bounded (+BOS/EOS)


def test_heldout_documents_are_disjoint_from_train_and_chosen_by_hash(
    stdlib_corpus: Corpus,
) -> None:
    train, heldout = set(stdlib_corpus.train_ids), set(stdlib_corpus.heldout_ids)
    assert train and heldout and not train & heldout
    assert all(is_heldout(d, STDLIB_SETTINGS) for d in heldout)
    assert not any(is_heldout(d, STDLIB_SETTINGS) for d in train)


def test_shards_are_disjoint_cover_the_train_stream_and_are_stable(
    stdlib_corpus: Corpus,
) -> None:
    for num_shards in (1, 2, 3, 7):
        shards = [stdlib_corpus.train_shard(i, num_shards) for i in range(num_shards)]
        # contiguous pieces in order: concatenation is exactly the stream (cover + disjoint)
        assert torch.equal(torch.cat(shards), stdlib_corpus.train_tokens)
        sizes = [s.numel() for s in shards]
        assert max(sizes) - min(sizes) <= 1
        again = load_corpus(STDLIB_SETTINGS)
        assert all(torch.equal(s, again.train_shard(i, num_shards)) for i, s in enumerate(shards))
    a, b = stdlib_corpus.train_shard(0, 2), stdlib_corpus.train_shard(1, 2)
    assert a.data_ptr() + a.numel() * a.element_size() <= b.data_ptr()
    with pytest.raises(CorpusError):
        stdlib_corpus.train_shard(2, 2)


def test_interleaved_shards_deal_out_whole_documents_in_turn(stdlib_corpus: Corpus) -> None:
    stream = stdlib_corpus.train_tokens
    starts = (stream == BOS_ID).nonzero().flatten().tolist()
    docs = [stream[a:b] for a, b in zip(starts, [*starts[1:], stream.numel()], strict=True)]
    assert len(docs) == len(stdlib_corpus.train_ids) > 3
    for num_shards in (1, 3):
        shards = [
            stdlib_corpus.train_shard(i, num_shards, interleaved=True) for i in range(num_shards)
        ]
        for i, shard in enumerate(shards):
            # shard i is documents i, i + n, i + 2n, ... whole (BOS first, EOS last), in order
            assert torch.equal(shard, torch.cat(docs[i::num_shards]))
            assert shard[0] == BOS_ID and shard[-1] == EOS_ID
        assert sum(s.numel() for s in shards) == stream.numel()
        again = load_corpus(STDLIB_SETTINGS)
        assert all(
            torch.equal(s, again.train_shard(i, num_shards, interleaved=True))
            for i, s in enumerate(shards)
        )
    with pytest.raises(CorpusError, match="empty"):
        stdlib_corpus.train_shard(len(docs), len(docs) + 1, interleaved=True)


def test_user_files_and_folders_are_read_in_sorted_order(tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * 20)
    (folder / "sub" / "notes.md").write_text("# notes\n" * 50)
    (folder / "image.png").write_bytes(b"\x89PNG\0\0binary")
    (folder / "blob.txt").write_bytes(b"abc\0def")  # binary content, skipped
    single = tmp_path / "single.txt"
    single.write_text("one more file\n" * 30)
    settings = CorpusSettings(sources=(str(folder), str(single)), heldout_fraction=0.2)
    corpus = load_corpus(settings)
    expected_order = [f"texts/doc{i:02d}.txt#0" for i in range(40)]
    expected_order += ["texts/sub/notes.md#0", "single.txt#0"]
    assert sorted(corpus.train_ids + corpus.heldout_ids) == sorted(expected_order)
    train = set(corpus.train_ids)
    assert list(corpus.train_ids) == [d for d in expected_order if d in train]
    assert 0 < len(corpus.heldout_ids) < len(expected_order) // 2
    stream = corpus.train_tokens
    assert int(stream[0]) == BOS_ID and int(stream[-1]) == EOS_ID
    assert int((stream == BOS_ID).sum()) == len(corpus.train_ids)


def test_missing_source_or_too_little_text_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="not a file or a folder"):
        load_corpus(CorpusSettings(sources=(str(tmp_path / "nope"),)))
    (tmp_path / "a.txt").write_text("short")
    with pytest.raises(CorpusError, match="held-out"):
        load_corpus(CorpusSettings(sources=(str(tmp_path / "a.txt"),)))
    with pytest.raises(CorpusError, match="fewer than one block"):
        TokenBlocks(torch.zeros(10, dtype=torch.int16), batch_size=2, context_tokens=16, seed=0)


def test_batches_are_shifted_blocks_fixed_by_seed_and_index(stdlib_corpus: Corpus) -> None:
    shard = stdlib_corpus.train_shard(0, 2)
    blocks = TokenBlocks(shard, batch_size=4, context_tokens=32, seed=5)
    first = [next(blocks) for _ in range(3)]
    inputs, targets = first[0]
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    same = TokenBlocks(shard, batch_size=4, context_tokens=32, seed=5)
    assert all(
        torch.equal(a[0], b[0]) for a, b in zip(first, [next(same) for _ in range(3)], strict=True)
    )
    resumed = TokenBlocks(shard, batch_size=4, context_tokens=32, seed=5, start_batch=2)
    assert torch.equal(next(resumed)[0], first[2][0])
    other = TokenBlocks(shard, batch_size=4, context_tokens=32, seed=6)
    assert not torch.equal(next(other)[0], inputs)


def test_eval_batches_are_fixed_and_the_loss_helper_restores_train_mode(
    stdlib_corpus: Corpus,
) -> None:
    kwargs = {"batch_size": 4, "context_tokens": 32, "max_batches": 3}
    batches = heldout_batches(stdlib_corpus.heldout_tokens, **kwargs)
    again = heldout_batches(stdlib_corpus.heldout_tokens, **kwargs)
    assert len(batches) == 3
    assert all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        for a, b in zip(batches, again, strict=True)
    )
    model = build_model(
        ModelConfig(context_tokens=32, d_model=32, n_layers=1, n_heads=2, mlp_hidden=64), seed=0
    )
    model.train()
    loss = evaluate_loss(model, batches)
    assert model.training
    assert 4.0 < loss < 7.0  # about ln(259) = 5.56 for an untrained model
    assert loss == evaluate_loss(model, batches)


def test_one_big_file_is_cut_into_chunks_that_feed_both_splits(tmp_path: Path) -> None:
    text = "".join(f"line {i}: some words here\n" for i in range(8000)).encode()
    big = tmp_path / "big.txt"
    big.write_bytes(text)
    settings = CorpusSettings(sources=(str(big),), document_chunk_bytes=4096)
    chunks = read_documents(settings)
    assert [d.doc_id for d in chunks] == [f"big.txt#{i}" for i in range(len(chunks))]
    assert b"".join(d.data for d in chunks) == text
    corpus = load_corpus(settings)
    assert corpus.train_ids and corpus.heldout_ids
    capped = read_documents(CorpusSettings(sources=(str(big),), max_total_bytes=10_000))
    assert b"".join(d.data for d in capped) == text[:10_000]


def test_files_sharing_a_name_get_distinct_ids_and_both_splits(tmp_path: Path) -> None:
    paths = []
    for i in range(40):
        folder = tmp_path / f"pkg{i}"
        folder.mkdir()
        (folder / "METADATA").write_text(f"package {i}\n" * 20)
        paths.append(str(folder / "METADATA"))
    settings = CorpusSettings(sources=tuple(paths), heldout_fraction=0.25)
    ids = [d.doc_id for d in read_documents(settings)]
    assert len(set(ids)) == 40 and ids[:2] == ["METADATA#0", "METADATA~1#0"]
    corpus = load_corpus(settings)  # same-named files no longer all fall on one side
    assert corpus.train_ids and corpus.heldout_ids
