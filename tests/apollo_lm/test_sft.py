"""Tests of apollo_lm.sft: rendering, loss masks, packing, splits, bad records."""

import json
import pathlib
import re

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from apollo_lm import sft
from apollo_lm import tokenizer as tokenizer_lib

SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2's template writes it (without the default system prompt).
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# A template whose earlier text depends on later turns: cannot be split.
NON_INCREMENTAL = (
    "{{ bos_token }}{{ messages | length }}"
    "{% for message in messages %}{{ message['content'] }}{% endfor %}")

_TEXT = ("The quick brown fox jumps over the lazy dog. User Assistant System "
         "what is two plus three? five. hello world, 0123456789 abc\n") * 20


def _tokenizer() -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=400, special_tokens=SPECIALS, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator([_TEXT], trainer=trainer)
  return tok


def _checkpoint(tmp_path: pathlib.Path, template: str | None = None,
                **config) -> pathlib.Path:
  folder = tmp_path / "ckpt"
  folder.mkdir(exist_ok=True)
  _tokenizer().save(str(folder / "tokenizer.json"))
  tok_config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", **config}
  if template is not None:
    tok_config["chat_template"] = template
  (folder / "tokenizer_config.json").write_text(json.dumps(tok_config))
  return folder


def _write_jsonl(path: pathlib.Path, records) -> pathlib.Path:
  lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
  path.write_text("\n".join(lines) + "\n")
  return path


def _counted_text(tok, ids, flags):
  """The text of the tokens the loss counts, as one string per run."""
  runs, current = [], []
  for i, f in zip(ids, flags):
    if f:
      current.append(i)
    elif current:
      runs.append(tok.decode(current))
      current = []
  if current:
    runs.append(tok.decode(current))
  return runs


class TestTokenizer:

  def test_reads_special_tokens_and_template(self, tmp_path):
    tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(tmp_path, CHATML))
    assert tok.eos_id == tok.tokenizer.token_to_id("</s>")
    assert tok.bos_id == tok.tokenizer.token_to_id("<s>")
    assert tok.chat_template == CHATML

  def test_eos_from_config_json_and_named_templates(self, tmp_path):
    folder = _checkpoint(tmp_path, [{"name": "tool_use", "template": "x"},
                                    {"name": "default", "template": CHATML}],
                         eos_token=None, bos_token=None)
    eos = _tokenizer().token_to_id("<|im_end|>")
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [eos, 1]}))
    tok = tokenizer_lib.load_checkpoint_tokenizer(folder)
    assert tok.eos_id == eos
    assert tok.bos_id is None
    assert tok.chat_template == CHATML

  def test_missing_tokenizer_json(self, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
      tokenizer_lib.load_checkpoint_tokenizer(tmp_path)

  def test_renders_like_apply_chat_template(self, tmp_path):
    tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(tmp_path, CHATML))
    messages = [{"role": "user", "content": "hi"}]
    assert (tok.render_chat(messages, add_generation_prompt=True)
            == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # Special tokens in the rendered text become their ids.
    ids = tok.chat_prompt_ids(messages)
    assert ids[0] == tok.tokenizer.token_to_id("<|im_start|>")


class TestMask:

  @pytest.fixture(autouse=True)
  def _tmp(self, tmp_path):
    self.tmp = tmp_path

  def test_prompt_completion(self):
    tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(self.tmp, CHATML))
    ids, flags = sft.tokenize_record(
        {"prompt": "what is two plus three? ", "completion": "five."}, tok)
    assert ids[0] == tok.bos_id
    assert ids[-1] == tok.eos_id
    assert _counted_text(tok, ids, flags) == ["five.</s>"]
    # Everything before the completion is the prompt, unchanged.
    prompt_ids = ids[:flags.index(True)]
    assert tok.decode(prompt_ids) == "<s>what is two plus three? "

  @pytest.mark.parametrize("template", [CHATML, None], ids=["template", "plain"])
  def test_chat_counts_assistant_turns_only(self, template):
    tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(self.tmp, template))
    messages = [{"role": "system", "content": "System says"},
                {"role": "user", "content": "what is two plus three?"},
                {"role": "assistant", "content": "five."},
                {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hello world"}]
    ids, flags = sft.tokenize_record({"messages": messages}, tok)
    if template:
      expected = ["five.<|im_end|>\n", "hello world<|im_end|>\n"]
      whole = tok.render_chat(messages)
    else:
      expected = ["five.</s>", "hello world</s>"]
      whole = ("<s>System: System says\n\nUser: what is two plus three?\n\n"
               "Assistant: five.</s>User: hello\n\nAssistant: hello world</s>")
    assert _counted_text(tok, ids, flags) == expected
    assert tok.decode(ids) == whole

  def test_conversational_prompt_completion(self):
    tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(self.tmp, CHATML))
    record = {"prompt": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "abc"},
                         {"role": "user", "content": "more"}],
              "completion": [{"role": "assistant", "content": "hello"}]}
    ids, flags = sft.tokenize_record(record, tok)
    assert _counted_text(tok, ids, flags) == ["hello<|im_end|>\n"]

  def test_generation_prompt_matches_training_prefix(self):
    for template in (CHATML, None):
      tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(self.tmp, template))
      messages = [{"role": "user", "content": "hello"}]
      ids, flags = sft.tokenize_record(
          {"messages": messages + [{"role": "assistant", "content": "five."}]}, tok)
      prompt = tok.chat_prompt_ids(messages)
      assert ids[:len(prompt)] == prompt
      assert flags[len(prompt)]
      assert not (any(flags[:len(prompt)]))


class TestBadRecord:

  RECORDS = [
      {"prompt": "a", "completion": "b"},                        # 1 good
      "{not json",                                                # 2
      {"prompt": "a"},                                            # 3
      {"prompt": "a", "completion": "  "},                        # 4
      ["a list"],                                                 # 5
      {"messages": [{"role": "user", "content": "hi"}]},          # 6
      {"messages": [{"role": "robot", "content": "hi"}]},         # 7
      {"messages": "hi"},                                         # 8
      {"prompt": 1, "completion": "b"},                           # 9
      {"prompt": "a", "completion": "hello world " * 40},         # 10
      {"messages": [{"role": "user", "content": "x"},
                    {"role": "assistant", "content": ""}]},       # 11
      {"messages": [{"role": "user"}]},                           # 12
  ]
  EXPECTED = {2: "not valid JSON", 3: "missing key: 'completion'",
              4: "empty completion", 5: "not an object",
              6: "no assistant message", 7: "unknown role",
              8: "bad messages", 9: "bad prompt", 10: "over-long",
              11: "empty completion", 12: "bad messages"}

  @pytest.fixture(autouse=True)
  def _tmp(self, tmp_path):
    self.tmp = tmp_path
    self.tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(self.tmp, CHATML))
    records = list(self.RECORDS)
    records.insert(5, "   ")  # a blank line is not a record: lines shift by 1
    self.path = _write_jsonl(self.tmp / "data.jsonl", records)

  def _expected(self):
    return {line + (line >= 6): reason for line, reason in self.EXPECTED.items()}

  def test_each_bad_record_is_reported_with_its_line(self):
    examples, report = sft.read_records(self.path, self.tok, max_tokens=40)
    assert len(examples) == 1
    assert examples[0].line == 1
    assert report.records == len(self.RECORDS)
    got = {b.line: b.reason for b in report.bad}
    expected = self._expected()
    assert sorted(got) == sorted(expected)
    for line, reason in expected.items():
      assert got[line].startswith(reason), (line, got[line])
    summary = report.summary()
    assert f"{self.path}:2: not valid JSON" in summary
    assert "11 skipped" in summary

  def test_strict_raises_naming_the_lines(self):
    with pytest.raises(ValueError, match=r"strict(.|\n)*data.jsonl:2: not valid"):
      sft.read_records(self.path, self.tok, max_tokens=40, strict=True)

  def test_no_usable_record(self):
    path = _write_jsonl(self.tmp / "bad.jsonl", [{"prompt": "a"}])
    with pytest.raises(ValueError, match=r"no usable record(.|\n)*:1: missing key"):
      sft.read_records(path, self.tok)

  def test_non_incremental_template(self):
    tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(self.tmp, NON_INCREMENTAL))
    with pytest.raises(sft.RecordError, match="incrementally"):
      sft.tokenize_record({"messages": [
          {"role": "user", "content": "x"},
          {"role": "assistant", "content": "y"}]}, tok)

  def test_template_errors_are_record_errors(self):
    tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(
        self.tmp, "{{ raise_exception('no system role') }}"))
    with pytest.raises(sft.RecordError, match="no system role"):
      sft.tokenize_record({"messages": [
          {"role": "user", "content": "x"},
          {"role": "assistant", "content": "y"}]}, tok)


def _examples(lengths, seed=0):
  rng = np.random.default_rng(seed)
  out = []
  for line, n in enumerate(lengths, 1):
    tokens = rng.integers(4, 300, n).astype(np.int32)
    target = rng.random(n) < 0.5
    out.append(sft.Example(tokens, target, line))
  return out


class TestPacking:

  @pytest.mark.parametrize("seq_len", [8, 16, 33])
  @pytest.mark.parametrize("seed", [0, 1, None])
  def test_rows_hold_each_example_once_without_crossing(self, seq_len, seed):
    rng = np.random.default_rng(seq_len)
    examples = _examples(rng.integers(2, seq_len + 2, 25), seed=seq_len)
    rows = sft.pack_examples(examples, seq_len, seed=seed)
    found = []
    for r in range(rows.num_rows):
      seg = rows.segment_ids[r]
      # Segments are 1, 2, ... in order, then padding (0) to the end.
      used = seg > 0
      assert np.all(used[:used.sum()])
      assert rows.loss_mask[r][~used].sum() == 0
      for s in range(1, seg.max() + 1):
        where = np.flatnonzero(seg == s)
        assert np.array_equal(where, np.arange(where[0], where[-1] + 1))
        np.testing.assert_array_equal(rows.positions[r, where], np.arange(where.size))
        # Rebuild the example from its own positions only.
        tokens = np.append(rows.inputs[r, where], rows.targets[r, where[-1]])
        np.testing.assert_array_equal(rows.targets[r, where][:-1],
                                      rows.inputs[r, where][1:])
        found.append((tokens.tobytes(), rows.loss_mask[r, where].tobytes()))
    expected = [(e.tokens.tobytes(), e.target[1:].astype(np.float32).tobytes())
                for e in examples]
    assert sorted(found) == sorted(expected)

  def test_first_fit_fills_rows(self):
    rows = sft.pack_examples(_examples([5, 5, 3, 3]), 6, seed=None)
    # 4 + 4 positions cannot share a row of 6; 2 + 2 fill the gaps.
    assert rows.num_rows == 2
    np.testing.assert_array_equal(rows.segment_ids[0], [1] * 4 + [2] * 2)

  def test_over_long_example(self):
    with pytest.raises(ValueError, match="line 1 has 10 tokens.*seq_len \\+ 1 = 9"):
      sft.pack_examples(_examples([10]), 8)


class TestData:

  @pytest.fixture(autouse=True)
  def _tmp(self, tmp_path):
    self.tmp = tmp_path
    self.tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(self.tmp, CHATML))
    self.records = [{"prompt": f"what is {a} plus {b}? ", "completion": str(a + b)}
                    for a in range(10) for b in range(10)]
    self.path = _write_jsonl(self.tmp / "train.jsonl", self.records)

  @pytest.mark.parametrize("fraction", [0.1, 0.3])
  def test_held_out_split_is_disjoint_and_stable(self, fraction):
    data = sft.load_sft_data(self.path, self.tok, 32, eval_fraction=fraction)
    again = sft.load_sft_data(self.path, self.tok, 32, eval_fraction=fraction)
    np.testing.assert_array_equal(data.eval.inputs, again.eval.inputs)
    def examples(rows):
      return {rows.inputs[r, rows.segment_ids[r] == s].tobytes()
              for r in range(rows.num_rows) for s in range(1, rows.segment_ids[r].max() + 1)}
    train, held = examples(data.train), examples(data.eval)
    assert not (train & held)
    assert len(train) + len(held) == len(self.records)
    assert 0.3 * fraction * 100 <= len(held) <= 3 * fraction * 100

  def test_eval_data_file_and_text_rejected_mix(self):
    held = _write_jsonl(self.tmp / "held.jsonl", self.records[:7])
    data = sft.load_sft_data(self.path, self.tok, 32, eval_data=held)
    assert data.eval.segment_ids.max(axis=1).sum() == 7
    assert len(data.reports) == 2
    text = self.tmp / "notes.txt"
    text.write_text(_TEXT)
    with pytest.raises(ValueError, match="same kind"):
      sft.load_sft_data(self.path, self.tok, 32, eval_data=text)
    with pytest.raises(ValueError, match="mixes records"):
      sft.load_sft_data([self.path, text], self.tok, 32)

  @pytest.mark.parametrize("fraction", [0.0, 1.0, -1])
  def test_bad_eval_fraction(self, fraction):
    with pytest.raises(ValueError, match="eval_fraction"):
      sft.load_sft_data(self.path, self.tok, 32, eval_fraction=fraction)

  def test_text_is_continued_pretraining(self):
    text = self.tmp / "notes.txt"
    text.write_text(_TEXT)
    data = sft.load_sft_data(text, self.tok, 16, eval_fraction=0.2)
    stream = np.append(self.tok.encode(_TEXT), self.tok.eos_id)
    rows = data.train.num_rows + data.eval.num_rows
    assert rows == stream.size // 17
    np.testing.assert_array_equal(data.train.inputs[0], stream[:16])
    np.testing.assert_array_equal(data.train.targets[0], stream[1:17])
    assert np.all(data.train.loss_mask == 1)
    assert data.eval.num_rows == round(0.2 * rows)
    np.testing.assert_array_equal(data.eval.inputs[-1],
                                  stream[(rows - 1) * 17:(rows - 1) * 17 + 16])

  def test_batches_are_resumable_and_split_over_processes(self):
    data = sft.load_sft_data(self.path, self.tok, 32, eval_fraction=0.1)
    batches = sft.RowBatches(data.train, 4, seed=3)
    first = [b.inputs for _, b in zip(range(2 * batches.steps_per_epoch), batches.iterate())]
    resumed = next(sft.RowBatches(data.train, 4, seed=3).iterate(5))
    np.testing.assert_array_equal(resumed.inputs, first[5])
    halves = [sft.RowBatches(data.train, 4, seed=3, process_index=p, process_count=2).batch(5)
              for p in range(2)]
    np.testing.assert_array_equal(np.concatenate([h.inputs for h in halves]), first[5])
    with pytest.raises(ValueError, match="fewer than batch_size"):
      sft.RowBatches(data.train, 10_000)

  def test_eval_batches_pad_with_uncounted_rows(self):
    data = sft.load_sft_data(self.path, self.tok, 32, eval_fraction=0.3)
    batches = sft.eval_row_batches(data.eval, 4)
    assert sum(b.loss_mask.sum() for b in batches) == data.eval.num_target_tokens
    assert len(batches) == -(-data.eval.num_rows // 4)


def test_packed_rows_give_each_example_its_own_logits():
  """Through the model, an example packed with others (segment ids,
  restarting positions) has the logits it has alone: no attention across
  examples."""
  import jax
  from flax import nnx
  from apollo_lm import model as model_lib
  from apollo_lm.configs import get_config

  config = get_config("tiny", vocab_size=300, hidden_size=32, num_heads=2,
                      intermediate_size=48, num_layers=2, max_seq_len=24,
                      num_kv_heads=1, head_dim=16)
  model = model_lib.Llama(config, rngs=nnx.Rngs(0))
  examples = _examples([9, 5, 12, 7, 4, 6], seed=3)
  rows = sft.pack_examples(examples, 24, seed=1)
  assert rows.segment_ids.max() > 1  # several examples share a row
  packed = model(jax.numpy.asarray(rows.inputs),
                 segment_ids=jax.numpy.asarray(rows.segment_ids),
                 positions=jax.numpy.asarray(rows.positions))
  checked = 0
  for r in range(rows.num_rows):
    for s in range(1, rows.segment_ids[r].max() + 1):
      where = np.flatnonzero(rows.segment_ids[r] == s)
      alone = model(jax.numpy.asarray(rows.inputs[r, where][None]))
      np.testing.assert_allclose(packed[r, where], alone[0], atol=2e-5)
      checked += 1
  assert checked == len(examples)


# ---------------------------------------------------------------------------
# Record layouts and sources.

_SYSTEM = "System says"
_Q, _X, _A = "what is two plus three?", "abc", "five."
# What each layout renders to with CHATML, and the text the loss counts.
_CHATML_TURNS = {
    "system": f"<|im_start|>system\n{_SYSTEM}<|im_end|>\n",
    "user": f"<|im_start|>user\n{_Q}\n{_X}<|im_end|>\n",
    "user_only": f"<|im_start|>user\n{_Q}<|im_end|>\n",
    "hello": "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhello world<|im_end|>\n",
    "answer": f"<|im_start|>assistant\n{_A}<|im_end|>\n",
}
LAYOUTS = [
    ("alpaca", {"instruction": _Q, "input": _X, "output": _A, "system": _SYSTEM},
     ["system", "user", "answer"]),
    ("alpaca", {"instruction": _Q, "input": "", "output": _A},
     ["user_only", "answer"]),
    ("alpaca", {"instruction": _Q, "output": _A,
                "history": [["hello", "hello world"]]},
     ["hello", "user_only", "answer"]),
    ("sharegpt", {"conversations": [
        {"from": "system", "value": _SYSTEM},
        {"from": "human", "value": f"{_Q}\n{_X}"},
        {"from": "gpt", "value": _A}]}, ["system", "user", "answer"]),
    ("sharegpt", {"system": _SYSTEM, "conversations": [
        {"from": "human", "value": "hello"}, {"from": "gpt", "value": "hello world"},
        {"from": "human", "value": _Q}, {"from": "gpt", "value": _A}]},
     ["system", "hello", "user_only", "answer"]),
    ("messages", {"messages": [
        {"role": "user", "content": _Q}, {"role": "assistant", "content": _A}]},
     ["user_only", "answer"]),
]


class TestLayouts:

  @pytest.fixture(autouse=True)
  def _tmp(self, tmp_path, monkeypatch):
    self.tmp = tmp_path
    self.tok = tokenizer_lib.load_checkpoint_tokenizer(_checkpoint(tmp_path, CHATML))
    datasets = pytest.importorskip("datasets")
    # Table files are converted into the datasets cache: keep it here.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE",
                        str(tmp_path / "datasets_cache"))

  @pytest.mark.parametrize("layout, record, turns", LAYOUTS)
  @pytest.mark.parametrize("data_format", ["auto", "forced"])
  def test_layout_is_detected_and_rendered(self, layout, record, turns,
                                           data_format):
    path = _write_jsonl(self.tmp / "d.jsonl", [record, record])
    examples, report = sft.read_records(
        path, self.tok, data_format=layout if data_format == "forced" else "auto")
    assert report.used == 2 and not report.bad
    assert sft.detect_layout(record) == layout
    ids, flags = examples[0].tokens.tolist(), examples[0].target.tolist()
    text = "".join(_CHATML_TURNS[t] for t in turns)
    assert self.tok.decode(ids) == text
    # Each turn tokenized alone (the template's pieces), only the last
    # assistant turn's content and end marker counted...
    assert ids == [i for t in turns for i in self.tok.encode(_CHATML_TURNS[t])]
    counted = _counted_text(self.tok, ids, flags)
    expected = [f"{_A}<|im_end|>\n"]
    if "hello" in turns:  # ... and every earlier assistant turn.
      expected.insert(0, "hello world<|im_end|>\n")
    assert counted == expected

  def test_prompt_completion_and_messages_mix_in_auto(self):
    records = [{"prompt": "a ", "completion": "b"}, LAYOUTS[-1][1]]
    path = _write_jsonl(self.tmp / "d.jsonl", records)
    _, report = sft.read_records(path, self.tok)
    assert report.used == 2
    with pytest.raises(ValueError, match="not data format messages"):
      sft.read_records(path, self.tok, data_format="messages")
    path = _write_jsonl(self.tmp / "e.jsonl", records[::-1])
    with pytest.raises(ValueError, match=":2: missing key: 'messages'"):
      sft.read_records(path, self.tok, data_format="messages", strict=True)

  @pytest.mark.parametrize("forced, found", [
      ("sharegpt", "alpaca"), ("alpaca", "sharegpt"), ("messages", "alpaca"),
      ("prompt_completion", "messages")])
  def test_forced_format_mismatch(self, forced, found):
    record = next(r for name, r, _ in LAYOUTS if name == found)
    path = _write_jsonl(self.tmp / "d.jsonl", ["", record])
    with pytest.raises(ValueError, match=re.escape(
        f"d.jsonl:2: the records are {found} (") + ".*" + re.escape(
            f"not data format {forced} (")):
      sft.read_records(path, self.tok, data_format=forced)

  def test_unknown_data_format(self):
    path = _write_jsonl(self.tmp / "d.jsonl", [LAYOUTS[0][1]])
    with pytest.raises(ValueError, match="allowed: auto, prompt_completion"):
      sft.read_records(path, self.tok, data_format="chatml")

  def test_bad_alpaca_and_sharegpt_records_name_their_lines(self):
    alpaca, sharegpt = LAYOUTS[0][1], LAYOUTS[3][1]
    path = _write_jsonl(self.tmp / "a.jsonl", [
        alpaca, {"instruction": _Q}, {**alpaca, "input": 3}, alpaca,
        {**alpaca, "history": ["x"]}, {**alpaca, "output": " "}])
    _, report = sft.read_records(path, self.tok)
    assert {b.line: b.reason.split(":")[0] for b in report.bad} == {
        2: "missing key", 3: "bad input", 5: "bad history", 6: "empty completion"}
    assert f"{path}:2: missing key: 'output'" in report.summary()
    path = _write_jsonl(self.tmp / "s.jsonl", [
        sharegpt, {"conversations": [{"from": "observation", "value": "x"}]},
        {"conversations": "hi"}, {"conversations": [{"from": "human"}]},
        {"conversations": [{"from": "human", "value": "x"}]}])
    _, report = sft.read_records(path, self.tok)
    assert {b.line: b.reason.split(":")[0] for b in report.bad} == {
        2: "unknown role", 3: "bad conversations", 4: "bad conversations",
        5: "no assistant message"}

  def test_json_array_file_reports_lines(self):
    alpaca = LAYOUTS[0][1]
    path = self.tmp / "alpaca_data.json"
    path.write_text("[\n" + json.dumps(alpaca) + ",\n  "
                    + json.dumps({"instruction": _Q}) + ",\n\n"
                    + json.dumps(alpaca, indent=1) + "\n]\n")
    examples, report = sft.read_records(path, self.tok)
    assert [e.line for e in examples] == [2, 5]
    assert [(b.line, b.reason) for b in report.bad] == [
        (3, "missing key: 'output'")]

  @pytest.mark.parametrize("spec, mapping", [
      ("instruction=question,output=answer",
       {"question": "instruction", "answer": "output"}),
      (["instruction=q", "input=ctx,output=a"],
       {"q": "instruction", "ctx": "input", "a": "output"}),
      (None, {})])
  def test_parse_columns(self, spec, mapping):
    assert sft.parse_columns(spec) == mapping

  @pytest.mark.parametrize("spec, message", [
      ("instruction", "is not key=column"), ("question=instruction",
                                             "unknown key 'question'")])
  def test_parse_columns_errors(self, spec, message):
    with pytest.raises(ValueError, match=message):
      sft.parse_columns(spec)

  def _table(self):
    """Alpaca rows under other column names, one bad (empty answer)."""
    return {"question": [_Q, _Q, _Q], "context": [_X, "", _X],
            "answer": [_A, _A, ""]}

  def _expected(self, row):
    record = {"instruction": _Q, "input": row, "output": _A}
    return sft.tokenize_record(sft.standard_record(record, "alpaca"), self.tok)

  def _check(self, source, **kwargs):
    columns = sft.parse_columns("instruction=question,input=context,output=answer")
    examples, report = sft.read_records(source, self.tok, columns=columns, **kwargs)
    assert [e.line for e in examples] == [1, 2]
    for example, row in zip(examples, [_X, ""]):
      ids, flags = self._expected(row)
      assert example.tokens.tolist() == ids and example.target.tolist() == flags
    assert [str(b) for b in report.bad] == [
        f"{source}[row 3]: empty completion: assistant message 1 is empty"]

  def test_column_mapping_on_json_lines(self):
    table = self._table()
    rows = [dict(zip(table, values)) for values in zip(*table.values())]
    path = _write_jsonl(self.tmp / "d.jsonl", rows)
    columns = sft.parse_columns("instruction=question,input=context,output=answer")
    examples, report = sft.read_records(path, self.tok, columns=columns)
    assert [e.line for e in examples] == [1, 2] and report.bad[0].line == 3
    assert examples[0].tokens.tolist() == self._expected(_X)[0]

  @pytest.mark.parametrize("suffix", ["csv", "parquet"])
  def test_table_files(self, suffix):
    import datasets  # pylint: disable=g-import-not-at-top
    path = self.tmp / f"d.{suffix}"
    getattr(datasets.Dataset.from_dict(self._table()), f"to_{suffix}")(str(path))
    assert sft.source_kind(path) == "table"
    self._check(path)

  def test_saved_dataset_folder_and_split(self):
    import datasets  # pylint: disable=g-import-not-at-top
    folder = self.tmp / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict(self._table()),
        "test": datasets.Dataset.from_dict({k: v[:1] for k, v in self._table().items()}),
    }).save_to_disk(str(folder))
    assert sft.source_kind(folder) == "saved"
    self._check(folder)
    examples, _ = sft.read_records(
        folder, self.tok, split="test",
        columns=sft.parse_columns("instruction=question,input=context,output=answer"))
    assert len(examples) == 1
    with pytest.raises(ValueError, match="no split 'dev' .*splits: train, test"):
      sft.read_records(folder, self.tok, split="dev")

  def test_hub_dataset_id(self, monkeypatch):
    """An id that is no local path goes to datasets.load_dataset (replaced
    here: no network) with the split."""
    import datasets  # pylint: disable=g-import-not-at-top
    calls = []

    def fake(name, **kwargs):
      calls.append((name, kwargs))
      return datasets.Dataset.from_dict(self._table())

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.chdir(self.tmp)
    assert sft.source_kind("org/alpaca-like") == "hub"
    self._check("org/alpaca-like", split="validation")
    assert calls == [("org/alpaca-like", {"split": "validation"})]

  def test_missing_sources(self, monkeypatch):
    import datasets  # pylint: disable=g-import-not-at-top

    def fail(name, **kwargs):
      raise FileNotFoundError(f"Couldn't find any data file at {name}.")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    monkeypatch.chdir(self.tmp)
    with pytest.raises(ValueError, match="org/none: no such file or folder, and"
                       " not a loadable Hugging Face Hub dataset"):
      sft.load_sft_data(["org/none"], self.tok, 32)
    with pytest.raises(FileNotFoundError, match="none.jsonl"):
      sft.load_sft_data(["none.jsonl"], self.tok, 32)
