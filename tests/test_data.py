"""data.py on its own (no Ray): texts, and the calibration and evaluation token windows cut from them."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from orchestrator.data import calibration_windows, eval_sentences, eval_windows, read_text, token_ids
from orchestrator.errors import UserError
from orchestrator.recipe import CalibrationDataConfig, EvalDataConfig


@pytest.fixture(scope="module")
def tokenizer(micro_lm):
    return AutoTokenizer.from_pretrained(micro_lm)


def test_calibration_windows_are_seeded_slices_of_the_text_with_their_hash(tokenizer):
    cfg = CalibrationDataConfig(num_samples=6, seq_len=32, seed=3)
    a, b = calibration_windows(tokenizer, cfg), calibration_windows(tokenizer, cfg)
    assert a.input_ids.shape == (6, 32) and a.input_ids.dtype == torch.int64
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    other = calibration_windows(tokenizer, CalibrationDataConfig(num_samples=6, seq_len=32, seed=4))
    assert other.sha256 != a.sha256
    ids = token_ids(tokenizer, read_text("reference", "train", "key")).tolist()
    text = " ".join(map(str, ids))
    for window in a.input_ids.tolist():  # each window is a run of consecutive tokens of the train split
        assert " ".join(map(str, window)) in text


def test_eval_windows_are_consecutive_and_capped(tokenizer):
    windows = eval_windows(tokenizer, EvalDataConfig(seq_len=16, max_windows=5))
    ids = token_ids(tokenizer, read_text("reference", "heldout", "key"))
    assert torch.equal(windows, ids[:80].reshape(5, 16))


def test_texts_come_from_txt_and_jsonl_files_with_errors_naming_the_key(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert read_text(str(tmp_path / "a.jsonl"), "train", "data.calibration.source") == "one\n\ntwo"
    (tmp_path / "bad.jsonl").write_text('{"text": "one"}\n{"txt": 2}\n')
    with pytest.raises(UserError, match=r"data.calibration.source: .*bad.jsonl line 2"):
        read_text(str(tmp_path / "bad.jsonl"), "train", "data.calibration.source")
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(UserError, match=r"data.eval.source: .* must be a .txt or .jsonl file"):
        read_text(str(tmp_path / "a.csv"), "heldout", "data.eval.source")
    (tmp_path / "short.txt").write_text("a few words")
    with pytest.raises(UserError, match=r"data.calibration.source: the text has \d+ tokens, fewer than seq_len=64"):
        calibration_windows(tokenizer, CalibrationDataConfig(source=str(tmp_path / "short.txt"), seq_len=64))
    with pytest.raises(UserError, match=r"data.eval.source: the held-out text has fewer than seq_len=64"):
        eval_windows(tokenizer, EvalDataConfig(source=str(tmp_path / "short.txt"), seq_len=64))


def test_eval_sentences_are_the_held_out_lines_of_four_words_or_more(tmp_path):
    lines = [f"sentence number {i} has words" for i in range(12)] + ["too short"]
    (tmp_path / "s.txt").write_text("\n".join(lines))
    got = eval_sentences(EvalDataConfig(source=str(tmp_path / "s.txt"), sentences=10, top_k=3))
    assert got == lines[:10]
    with pytest.raises(UserError, match="top_k=20"):
        eval_sentences(EvalDataConfig(source=str(tmp_path / "s.txt"), sentences=30, top_k=20))


def test_calibration_sentences_are_seeded_lines_with_special_tokens_and_a_padding_mask(tmp_path):
    from orchestrator.data import calibration_sentences
    from orchestrator.reference import resolve_reference

    tokenizer = AutoTokenizer.from_pretrained(resolve_reference("minilm", progress=False))
    cfg = CalibrationDataConfig(num_samples=8, seq_len=64, seed=3)
    a, b = calibration_sentences(tokenizer, cfg), calibration_sentences(tokenizer, cfg)
    assert torch.equal(a.input_ids, b.input_ids) and a.sha256 == b.sha256
    assert calibration_sentences(tokenizer, CalibrationDataConfig(num_samples=8, seq_len=64, seed=4)).sha256 != a.sha256
    lengths = a.attention_mask.sum(1)
    assert a.input_ids.shape == (8, int(lengths.max())) and lengths.min() < lengths.max()  # padded to the longest
    assert (a.input_ids[:, 0] == tokenizer.cls_token_id).all()  # each a sentence as the encoder reads one
    assert all(a.input_ids[i, n - 1] == tokenizer.sep_token_id for i, n in enumerate(lengths.tolist()))
    assert (a.input_ids[a.attention_mask == 0] == tokenizer.pad_token_id).all()
    (tmp_path / "few.txt").write_text("one line of words\nand another line here\n")
    with pytest.raises(UserError, match=r"data.calibration.source: 2 lines of 4\+ words, fewer than num_samples=8"):
        calibration_sentences(tokenizer, CalibrationDataConfig(source=str(tmp_path / "few.txt"), num_samples=8))


def test_encoders_calibrate_on_sentences_and_causal_lms_on_windows_by_default(tmp_path, micro_lm):
    from orchestrator.plan import make_plan
    from orchestrator.recipe import load_recipe
    from tests.helpers import REPO

    def plan(model, *extra):
        recipe = load_recipe(REPO / "recipes" / "gptq-w4g128.yaml", [f"model.path={model}", f"output.dir={tmp_path}",
                                                                     "data.calibration.num_samples=8", *extra])
        return make_plan(recipe, progress=False).calibration

    encoder = plan("reference:minilm")
    assert encoder.attention_mask is not None and (encoder.attention_mask == 0).any()
    assert plan(micro_lm).attention_mask is None
    assert plan("reference:minilm", "data.calibration.shape=windows").attention_mask is None
