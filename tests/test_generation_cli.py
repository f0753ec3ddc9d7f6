"""`flash-experts generate` and `generate-names` end to end on a tiny saved model, against the library."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from flash_experts.cli.main import main
from flash_experts.generation.generate import generate
from flash_experts.generation.sampling import SamplingConfig
from flash_experts.mtg.cleaning import is_valid_card_name
from tiny_tokenizer import make_tokenizer  # noqa: E402


def make_hf_model(vocab_size: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab_size, n_positions=64,
                                      initializer_range=0.3, bos_token_id=0, eos_token_id=0)).eval()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    tokenizer = make_tokenizer()
    make_hf_model(len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_generate_cli_prints_library_output(model_dir, capsys):
    """Reference: the library's `generate` on the same saved model, greedy."""
    code = main(["generate", str(model_dir), "--prompt", "Sword of", "--max-new-tokens", "6", "--greedy",
                 "--no-stream", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    tokenizer = make_tokenizer()
    model = make_hf_model(len(tokenizer))
    expected = generate(model, tokenizer, ["Sword of"], SamplingConfig(temperature=0), 6)
    assert out == "Sword of" + expected.texts[0] + "\n"
    assert "new tokens in" in err and "tokens/s" in err


def test_generate_cli_bf16_weights_match_hf_in_bf16(model_dir, capsys):
    """Reference: HF's GPT2LMHeadModel cast to bf16, greedy through HF `generate`; `--dtype bf16` must decode
    with bf16 weights (the fp32 model's tokens differ at this initialisation, so the test sees the cast)."""
    code = main(["generate", str(model_dir), "--prompt", "Sword of", "--max-new-tokens", "8", "--greedy",
                 "--no-stream", "--device", "cpu", "--dtype", "bf16"])
    out = capsys.readouterr().out
    assert code == 0
    tokenizer = make_tokenizer()
    prompt = tokenizer("Sword of", return_tensors="pt")
    expected = {}
    for dtype in (torch.bfloat16, torch.float32):
        hf = make_hf_model(len(tokenizer)).to(dtype)
        ids = hf.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
        expected[dtype] = tokenizer.decode(ids[0, prompt["input_ids"].shape[1]:])
    assert expected[torch.bfloat16] != expected[torch.float32]
    assert out == "Sword of" + expected[torch.bfloat16] + "\n"


def test_generate_cli_streams_first_sample(model_dir, capsys):
    """Reference: the non-streamed run; streaming prints the same text for sample 1, then the others."""
    args = ["generate", str(model_dir), "--prompt", "the", "--max-new-tokens", "5", "--seed", "3",
            "--num-samples", "2", "--temperature", "1.0", "--top-k", "0", "--top-p", "1", "--device", "cpu"]
    assert main(args + ["--no-stream"]) == 0
    plain = capsys.readouterr().out
    assert main(args) == 0
    streamed = capsys.readouterr().out
    first_plain = plain.split("--- sample 2/2")[0].split("\n", 1)[1]  # after the "--- sample 1/2" header
    assert streamed.startswith(first_plain)
    assert "--- sample 2/2" in streamed


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--top-p", "0"], "top_p"),
        (["--top-p", "1.5"], "top_p"),
        (["--temperature", "-1"], "temperature"),
        (["--num-samples", "0"], "num-samples"),
        (["--max-new-tokens", "500"], "positions"),
        (["--max-new-tokens", "-3"], "max-new-tokens"),
        (["--allow-regex", "[oops"], "allowed_regex"),
    ],
)
def test_generate_cli_absurd_arguments_are_one_line_errors(model_dir, capsys, extra, message):
    """Hand-listed absurd arguments: exit code 2 and one `error:` line naming the problem."""
    code = main(["generate", str(model_dir), "--prompt", "the", "--device", "cpu"] + extra)
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any model-loading progress bar
    assert code == 2 and err.startswith("error:") and message in err


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_generate_cli_quantize_decodes_the_quantized_model(model_dir, capsys, scheme):
    """Reference: HF's GPT2LMHeadModel with its matrices replaced by the library's `quantize`, greedy through the
    library's `generate`; the CLI must decode with the quantized weights (at this initialisation, where even
    bf16 changes the tokens, int8 and int4 do too, so the test sees the quantization)."""
    import copy

    from flash_experts.model.quantize import quantize

    code = main(["generate", str(model_dir), "--prompt", "Sword of", "--max-new-tokens", "8", "--greedy",
                 "--no-stream", "--device", "cpu", "--quantize", scheme])
    out = capsys.readouterr().out
    assert code == 0
    tokenizer = make_tokenizer()
    hf = make_hf_model(len(tokenizer))
    greedy = SamplingConfig(temperature=0)
    expected = generate(quantize(copy.deepcopy(hf), scheme), tokenizer, ["Sword of"], greedy, 8).texts[0]
    assert expected != generate(hf, tokenizer, ["Sword of"], greedy, 8).texts[0]
    assert out == "Sword of" + expected + "\n"


def test_generate_cli_quantize_int4_on_a_shape_it_cannot_serve_is_one_error_line(tmp_path, capsys):
    """A width of 48 is not a multiple of int4's group of 32: one `error:` line naming int8, exit 2."""
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=48, n_head=4, vocab_size=len(tokenizer), n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    code = main(["generate", str(tmp_path), "--prompt", "Sword", "--max-new-tokens", "2", "--device", "cpu",
                 "--quantize", "int4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("error: int4 cannot serve") and "--quantize int8" in err[-1]
    assert not any("Traceback" in line for line in err)


def test_evaluate_cli_quantize_int8_reports_the_quantized_perplexity(model_dir, tmp_path, capsys):
    """Reference: `evaluate_perplexity` of the quantized HF model (the CLI must evaluate the int8 weights), which
    stays within a few percent of the fp32 model's perplexity."""
    import copy
    import json

    from flash_experts.evaluation.perplexity import evaluate_perplexity
    from flash_experts.model.quantize import quantize_int8

    text = tmp_path / "notes.txt"
    text.write_text("Sword of Fire and Ice. Llanowar Elves tap for green mana. " * 20, encoding="utf-8")
    report = tmp_path / "ppl.json"
    code = main(["evaluate", str(model_dir), "--text", str(text), "--device", "cpu", "--quiet",
                 "--quantize", "int8", "--json", str(report)])
    assert code == 0
    got = json.loads(report.read_text())["perplexity"]
    tokenizer = make_tokenizer()
    stream = torch.tensor(tokenizer.encode(text.read_text()))
    hf = make_hf_model(len(tokenizer))
    want = evaluate_perplexity(quantize_int8(copy.deepcopy(hf)), stream, quiet=True).perplexity
    fp32 = evaluate_perplexity(hf, stream, quiet=True).perplexity
    assert got == pytest.approx(want, rel=1e-6)
    assert got != fp32 and got == pytest.approx(fp32, rel=0.05)


def test_generate_names_cli_marks_new_and_real(model_dir, tmp_path, capsys):
    """Reference: the reference-names file; every printed name is valid, distinct and marked against it."""
    reference = tmp_path / "names.txt"
    reference.write_text("Llanowar Elves\nSword of Fire and Ice\n", encoding="utf-8")
    code = main(["generate-names", str(model_dir), "-n", "5", "--type", "Creature — Elf", "--colors", "G",
                 "--reference-names", str(reference), "--seed", "0", "--max-rounds", "2",
                 "--temperature", "1.5", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0
    lines = [line for line in out.splitlines() if line.strip()]
    real = {"llanowar elves", "sword of fire and ice"}
    for line in lines:
        mark, name = line[:4].strip(), line[6:]
        assert is_valid_card_name(name)
        assert mark == ("real" if name.lower() in real else "new")
    assert len({line[6:].lower() for line in lines}) == len(lines) <= 5
    assert "validity" in err and "uniqueness" in err and "novelty" in err and "2 names from" in err


def test_generate_names_cli_rejects_bad_counts(model_dir, capsys):
    """Hand-listed absurd arguments: -n 0 and an unknown colour are one-line errors."""
    assert main(["generate-names", str(model_dir), "-n", "0"]) == 2
    assert "num-names" in capsys.readouterr().err
    assert main(["generate-names", str(model_dir), "--type", "Creature", "--colors", "purple", "--device", "cpu",
                 "--reference-names", __file__]) == 2
    assert "colour" in capsys.readouterr().err


def test_tensor_prompts_need_no_tokenizer():
    """Plain reference: token-id prompts without a tokenizer give the same ids as with one."""
    tokenizer = make_tokenizer()
    model = make_hf_model(len(tokenizer))
    ids = torch.tensor([tokenizer.encode("Sword of")])
    with_tok = generate(model, tokenizer, ids, SamplingConfig(temperature=0), 5, eos_token_id=[])
    without = generate(model, None, ids, SamplingConfig(temperature=0), 5, eos_token_id=[])
    assert with_tok.token_ids == without.token_ids and without.texts == [""]


def test_generate_cli_allow_regex_and_ban_words(model_dir, capsys):
    """Plain reference (re.fullmatch): every generated character is one the regex allows.

    (That banned words never appear as token sequences is checked in test_generation.py.)"""
    import re

    code = main(["generate", str(model_dir), "--prompt", "the", "--max-new-tokens", "15", "--seed", "0",
                 "--temperature", "1.5", "--top-k", "0", "--top-p", "1", "--no-stream", "--device", "cpu",
                 "--allow-regex", "[a-z ]+", "--ban-words", "the"])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("the")
    continuation = out[len("the"):].rstrip("\n")
    assert re.fullmatch(r"[a-z ]*", continuation)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate-names", "{model}", "--colors", "G"], "--colors needs --type"),
        (["generate-names", "{model}", "--max-rounds", "0"], "max-rounds"),
        (["generate", "{model}", "--prompt", "the", "--ban-token-ids", "100000000000"], "outside the model's vocabulary"),
        (["generate", "{model}", "--prompt", "the", "--min-p", "1.5"], "min_p"),
        (["generate", "{model}", "--prompt", "the", "--repetition-penalty", "-1"], "repetition_penalty"),
        (["generate", "{model}", "--prompt", "the", "--top-k", "-1"], "top_k"),
        (["generate", "{model}", "--prompt", "the", "--stop", ""], "stop strings"),
        (["generate", "{model}", "--prompt", "the", "--dtype", "fp16"], "fp16 needs a CUDA device"),
    ],
)
def test_more_absurd_arguments_are_one_line_errors(model_dir, capsys, argv, message):
    """Hand-listed absurd arguments for both verbs: exit code 2 and one `error:` line naming the problem."""
    code = main([a.format(model=model_dir) for a in argv] + ["--device", "cpu", "--max-new-tokens", "4"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert code == 2 and len(errors) == 1 and message in errors[0]


def test_stop_argument_escapes_hand_made(model_dir, capsys):
    """Hand-made: `--stop '\\n'` (backslash, n from a shell) is a newline; the CLI cuts where the library does."""
    from flash_experts.cli.generate import _unescape

    assert _unescape("\\n") == "\n" and _unescape("a\\tb") == "a\tb" and _unescape("é.") == "é."
    tokenizer = make_tokenizer()
    expected = generate(make_hf_model(len(tokenizer)), tokenizer, ["the"], SamplingConfig(temperature=0), 12)
    text = expected.texts[0]
    stop = text[len(text) // 2:len(text) // 2 + 1]  # a character from the middle of the greedy text
    assert main(["generate", str(model_dir), "--prompt", "the", "--max-new-tokens", "12", "--greedy", "--no-stream",
                 "--device", "cpu", "--stop", stop]) == 0
    assert capsys.readouterr().out == "the" + text[:text.index(stop)] + "\n"


def test_generate_cli_compile_on_a_family_we_do_not_have_says_so_and_decodes_eagerly(tmp_path, capsys):
    """Reference: the same command without --compile. A transformers GPT-2 or Llama folder now runs in our class
    (tests/test_our_classes.py); a family we have no class for (GPT-NeoX) runs as transformers' own: one note says
    so, the decode step is not compiled, one warning line says that, and the output is unchanged."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64)
                       ).save_pretrained(tmp_path / "neox")
    tokenizer.save_pretrained(tmp_path / "neox")
    argv = ["generate", str(tmp_path / "neox"), "--prompt", "Sword of", "--max-new-tokens", "6", "--greedy",
            "--no-stream", "--device", "cpu"]
    assert main(argv) == 0
    plain = capsys.readouterr()
    assert "runs as transformers' GPTNeoXForCausalLM: GPTNeoXForCausalLM (gpt_neox) has no class of ours" in plain.err
    with pytest.warns(UserWarning, match="not one of our models; decoding eagerly"):
        assert main([*argv, "--compile"]) == 0
    captured = capsys.readouterr()
    assert captured.out == plain.out and "Traceback" not in captured.err