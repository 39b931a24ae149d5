"""Text data path: tokenizer, documents, fairseq complete_doc blocks, batches, bad input, tfds.

References: fairseq's TokenBlockDataset slice loop re-implemented from its description (spec §2.3),
documents whose words identify them (blocks never mix two), RoBERTa's special-token layout.
"""

import os
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import text_base
from d2vjax.data import text as text_data
from d2vjax.data import tfds_text
from d2vjax.data import tokenizer as tok_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["function", "class", "value", "object", "module", "string", "number", "list"]


def _corpus(tmp_path, n_docs=8, seed=0):
  """A text file in fairseq format: doc d repeats WORDS[d] (so a block's words name its doc)."""
  rng = np.random.default_rng(seed)
  docs = []
  for d in range(n_docs):
    lines = [" ".join([WORDS[d]] * int(rng.integers(2, 25))) + "." for _ in range(
        int(rng.integers(1, 9)))]
    docs.append(lines)
  path = tmp_path / "corpus.txt"
  path.write_text("\n\n".join("\n".join(l) for l in docs) + "\n")
  return str(path), docs


# ----------------------------------------------------------------------------- tokenizer


def test_embedded_tokenizer_layout_and_round_trip():
  tok = tok_lib.load()
  assert tok.vocab_size == tok_lib.EMBEDDED_VOCAB_SIZE == 4096
  assert [tok.id_to_token(i) for i in tok.special_ids] == ["<s>", "<pad>", "</s>", "<unk>",
                                                           "<mask>"]
  assert tok.special_ids == (0, 1, 2, 3, 4095) == tok_lib.special_ids(4096)
  text = "The \"if\" statement selects exactly one suite; café — 東京 <mask> </s>!"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and tok.decode(ids) == text  # byte-level: lossless
  # Special-token strings in raw text stay ordinary bytes (no injected control ids).
  assert not np.isin(ids, tok.special_ids).any()
  again = pickle.loads(pickle.dumps(tok))
  np.testing.assert_array_equal(again.encode(text), ids)
  assert again.vocab_sha256 == tok.vocab_sha256


def test_tokenizer_layout_check_and_vocab_merges_conversion(tmp_path):
  """A GPT-2/RoBERTa-style vocab.json + merges.txt converts with ids unchanged; a tokenizer whose
  <mask> is not last is rejected."""
  from tokenizers import Tokenizer, models  # pylint: disable=g-import-not-at-top
  from tokenizers.pre_tokenizers import ByteLevel  # pylint: disable=g-import-not-at-top
  alphabet = sorted(ByteLevel.alphabet())
  vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
  for ch in alphabet:
    vocab[ch] = len(vocab)
  merges = [("h", "e"), ("he", "l"), ("hel", "l"), ("hell", "o")]
  for a, b in merges:
    vocab[a + b] = len(vocab)
  vocab["<mask>"] = len(vocab)
  (tmp_path / "vocab.json").write_text(__import__("json").dumps(vocab))
  (tmp_path / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges))
  tok = tok_lib.from_vocab_merges(tmp_path / "vocab.json", tmp_path / "merges.txt")
  assert tok.vocab_size == len(vocab) and tok.mask_id == vocab["<mask>"]
  assert list(tok.encode("hello")) == [vocab["hello"]]
  bad = Tokenizer(models.BPE(vocab={"<mask>": 0, "<s>": 1, "<pad>": 2, "</s>": 3, "<unk>": 4},
                             merges=[]))
  bad.add_special_tokens(["<mask>", "<s>", "<pad>", "</s>", "<unk>"])
  with pytest.raises(ValueError, match="layout"):
    tok_lib.TextTokenizer(bad)
  with pytest.raises(FileNotFoundError, match="nowhere.json"):
    tok_lib.load(tmp_path / "nowhere.json")


def test_tokenizer_cli_trains_from_files(tmp_path):
  path, _ = _corpus(tmp_path)
  out = str(tmp_path / "tok.json")
  p = subprocess.run([sys.executable, "-m", "d2vjax.data.tokenizer", f"--files={path}",
                      "--vocab_size=300", f"--out={out}"], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert p.returncode == 0, p.stderr
  tok = tok_lib.load(out)
  assert 261 < tok.vocab_size <= 300 and tok.mask_id == tok.vocab_size - 1
  assert tok.decode(tok.encode("alpha bravo.")) == "alpha bravo."


# ----------------------------------------------------------------------------- documents, blocks


def test_parse_lines_documents_and_bad_lines():
  lines = [b"", b"first doc line", b"second line", b"", b"", b"\xff\xfe not utf8", b"  ",
           b"doc two", b"", b"doc three \xe2\x80\x94 ok"]
  counts = {}
  import collections  # pylint: disable=g-import-not-at-top
  counts = collections.Counter()
  docs = text_data.parse_lines(lines, source="f.txt", counts=counts)
  assert [d.sentences for d in docs] == [("first doc line", "second line"), ("doc two",),
                                         ("doc three \u2014 ok",)]
  assert [d.key for d in docs] == ["f.txt:2", "f.txt:8", "f.txt:10"]
  assert counts == {"invalid_utf8": 1, "empty_line": 3}
  per_file = text_data.parse_lines(lines, source="f", doc_mode="file", counts=counts)
  assert len(per_file) == 1 and len(per_file[0].sentences) == 4
  text_data.parse_lines([b"", b" "], source="e", counts=counts)
  assert counts["empty_file"] == 1


def _fairseq_complete_doc(sizes, block_size, document_sep_len=1):
  """fairseq TokenBlockDataset(break_mode='complete_doc') slice loop, from its description: over
  the flat item sizes (each line incl. </s>; an empty line, size 1, separates documents)."""
  out, tok, i, cur = [], 0, 0, 0
  while i < len(sizes):
    if (cur + sizes[i] > block_size or sizes[i] == document_sep_len) and cur > 0:
      out.append((tok, tok + cur))
      tok += cur
      cur = 0
      if sizes[i] == document_sep_len:
        tok += sizes[i]
        i += 1
    else:
      cur += sizes[i]
      i += 1
  if cur > 0:
    out.append((tok, tok + cur))
  return out


@pytest.mark.parametrize("block_size", [7, 31, 127])
def test_complete_doc_blocks_match_fairseq(block_size):
  rng = np.random.default_rng(block_size)
  docs = [rng.integers(2, block_size + 1, int(rng.integers(1, 12))) for _ in range(40)]
  lens = np.concatenate(docs)
  offs = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
  blocks, counts = text_data.complete_doc_blocks(lens, offs, block_size)
  assert counts == {}
  # Our (doc, start, end) → offsets in fairseq's flat stream (one separator id between docs).
  doc_base = np.concatenate([[0], np.cumsum([d.sum() + 1 for d in docs])])
  ours = [(int(doc_base[d] + s), int(doc_base[d] + e)) for d, s, e in blocks]
  flat = []
  for k, d in enumerate(docs):
    flat += list(d) + ([1] if k < len(docs) - 1 else [])
  assert ours == _fairseq_complete_doc(flat, block_size)
  assert np.all(blocks[:, 2] - blocks[:, 1] <= block_size)


def test_long_sentences_are_split_and_counted():
  blocks, counts = text_data.complete_doc_blocks([3, 12, 2, 2], [0, 4], 5)
  # 3 | 12 → 5, 5, 2 (+2 fits) | 2 ; every piece ≤ 5, nothing lost.
  assert blocks.tolist() == [[0, 0, 3], [0, 3, 8], [0, 8, 13], [0, 13, 17], [0, 17, 19]]
  assert counts == {"long_sentence_split": 1}


# ----------------------------------------------------------------------------- batches


def _files_config(path, **kw):
  c = text_base.get_config("test")
  c.data.update(dict(source="files", files=path, num_threads=0, **kw))
  return c


def test_batches_blocks_bos_eos_and_shapes(tmp_path):
  """Every row: <s> first, </s> last, pads after; its words come from ONE document; the batch
  shapes are the planned (rows, bucket) pairs; one epoch covers the planned batches."""
  path, docs = _corpus(tmp_path)
  c = _files_config(path, tokens_per_sample=32, buckets=[16, 32], budget_tokens=4 * 32)
  examples, skipped = text_data.examples_from_config(c.data, "train")
  assert skipped == {}
  plan = text_data.plan_from_config(c.data, examples, 1)
  assert plan.shapes() and set(plan.shapes()) <= {(8, 16), (4, 32)}
  tok = tok_lib.load()
  batches = list(text_data.make_text_iterator(c.data, examples=examples, num_epochs=1,
                                              batch_fn=text_data.text_mask_fn(c.masking)))
  assert len(batches) == plan.total_batches
  rows = 0
  for b in batches:
    tokens, pad = b["tokens"], b["padding_mask"]
    assert tokens.shape in plan.shapes() and b["mask"].shape == tokens.shape
    for r in range(tokens.shape[0]):
      n = int((~pad[r]).sum())
      row = tokens[r, :n]
      assert not pad[r, :n].any() and np.all(tokens[r, n:] == tok_lib.PAD_ID)
      assert row[0] == tok_lib.BOS_ID and row[-1] == tok_lib.EOS_ID
      assert not np.isin(row[1:], [tok_lib.BOS_ID, tok_lib.PAD_ID]).any()
      words = set(re.findall(r"[a-z]+", tok.decode(row, skip_special_tokens=True)))
      assert len(words) == 1 and words <= set(WORDS)  # never crosses a document
      assert n <= 32
      rows += 1
    assert b["_bad"] == {} and np.all(b["_valid_tokens"] == (~pad).sum(1))
  assert rows == sum(r * n for (r, _), n in plan.shapes().items())


def test_iterator_state_resumes_at_the_next_batch(tmp_path):
  path, _ = _corpus(tmp_path)
  c = _files_config(path, tokens_per_sample=32, buckets=[16, 32], budget_tokens=2 * 32)
  examples, _ = text_data.examples_from_config(c.data, "train")
  fn = text_data.text_mask_fn(c.masking)
  it = text_data.make_text_iterator(c.data, examples=examples, batch_fn=fn)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it2 = text_data.make_text_iterator(c.data, examples=examples, batch_fn=fn)
  it2.set_state(state)
  for w in want:
    got = next(it2)
    for k in ("tokens", "masked_tokens", "mask", "padding_mask"):
      np.testing.assert_array_equal(got[k], w[k])


def test_bad_input_is_counted_not_fatal(tmp_path):
  good, _ = _corpus(tmp_path)
  bad = tmp_path / "bad.txt"
  bad.write_bytes(b"\n\nfine line one.\n\xc3\x28 broken utf8\n\n\n" + b"word " * 200 + b"\n")
  empty = tmp_path / "empty.txt"
  empty.write_bytes(b"\n \n")
  c = _files_config(f"{good},{bad},{empty}")
  examples, skipped = text_data.examples_from_config(c.data, "train")
  # bad.txt: 2 leading blanks + 1 extra blank; empty.txt: 2 blank lines and no document.
  assert skipped == {"invalid_utf8": 1, "empty_line": 5, "empty_file": 1,
                     "long_sentence_split": 1}
  assert len(examples) > 0 and examples.lengths.max() <= c.data.tokens_per_sample
  with pytest.raises(FileNotFoundError, match="missing"):
    text_data.examples_from_config(_files_config(str(tmp_path / "missing.txt")).data)
  c.data.vocab_size = 50265  # the model's vocabulary must be the tokenizer's
  with pytest.raises(ValueError, match="50265"):
    text_data.examples_from_config(c.data)


# ----------------------------------------------------------------------------- tfds


def test_tfds_text_round_trip_without_tensorflow(tmp_path):
  tfds.disable_progress_bar()
  manual = tmp_path / "manual"
  manual.mkdir()
  path, docs = _corpus(manual)
  (manual / "valid.txt").write_text("list list list.\nname name.\n")
  data_dir = str(tmp_path / "tfds")
  out = tfds_text.prepare(str(manual), data_dir, tokens_per_sample=32,
                          split_files={"train": ["corpus.txt"], "valid": "valid.txt"})
  in_memory, _ = text_data.blocks_from_documents(
      tok_lib.load(), text_data.read_text_files(path)[0], 32)
  assert out["splits"] == {"train": len(in_memory), "valid": 1}
  ds = tfds.data_source(tfds_text.NAME, data_dir=data_dir, split="train")
  assert len(ds) == len(in_memory)
  for i in range(len(ds)):
    rec = ds[i]
    np.testing.assert_array_equal(rec["tokens"], in_memory.block_tokens(i))
    assert rec["num_tokens"] == rec["tokens"].size and rec["doc"].decode().startswith("corpus")
  # Through the config dispatch and the pipeline.
  c = text_base.get_config("test")
  c.data.update(dict(source="tfds", tfds_data_dir=data_dir, tokens_per_sample=32,
                     buckets=[16, 32], budget_tokens=2 * 32, num_threads=0))
  examples, skipped = text_data.examples_from_config(c.data, "train")
  np.testing.assert_array_equal(examples.lengths, in_memory.lengths)
  assert skipped == {}
  batch = next(text_data.make_text_iterator(c.data, examples=examples,
                                            batch_fn=text_data.text_mask_fn(c.masking)))
  assert batch["tokens"][:, 0].tolist() == [tok_lib.BOS_ID] * batch["tokens"].shape[0]
  assert "tensorflow" not in sys.modules
  c.data.tokens_per_sample = 64
  c.data.buckets = [64]
  with pytest.raises(ValueError, match="tokens_per_sample=32"):
    text_data.examples_from_config(c.data, "train")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    tfds_text.list_blocks(data_dir=str(tmp_path / "nowhere"))
