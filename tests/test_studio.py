"""The studio: what the page shows is what the model computes, and bad input never stops the server.

References: the router's softmax recomputed in float64 from the MoE layer's input (captured with a hook of
this test's own, not the studio's), float64 log-softmax of the model's logits, and HF's own eager attention
probabilities (`output_attentions=True`) of the dense source model, which an upcycled model at step 0 shares.
HTTP behaviour through FastAPI's TestClient; the page itself in headless Chromium where it is installed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from conftest import tiny_gpt2_config
from flash_experts.model import upcycle
from flash_experts.model.moe import MoELayer
from test_llama_moe import randomize, tiny_llama_config
from test_plots import _synthetic_records, _write_run
from tiny_tokenizer import make_tokenizer

fastapi = pytest.importorskip("fastapi", reason="the studio extra is not installed (pip install -e '.[studio]')")
from fastapi.testclient import TestClient  # noqa: E402

from flash_experts.studio.app import Studio, create_app  # noqa: E402
from flash_experts.studio.trace import attention_maps, trace_text  # noqa: E402


def dense_and_moe(family: str, vocab: int):
    torch.manual_seed(0)
    if family == "llama":
        dense = randomize(LlamaForCausalLM(tiny_llama_config(vocab_size=vocab, attn_implementation="eager")))
    else:
        dense = randomize(GPT2LMHeadModel(tiny_gpt2_config(vocab_size=vocab, attn_implementation="eager")))
    moe = upcycle(dense, num_experts=4, top_k=2).eval()
    return dense.eval(), moe


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shown_experts_and_probabilities_are_the_routers_own(family):
    tokenizer = make_tokenizer()
    _, moe = dense_and_moe(family, len(tokenizer))
    with torch.no_grad():  # routers that disagree between tokens (fresh upcycled routers are near-uniform)
        for layer in moe.modules():
            if isinstance(layer, MoELayer):
                layer.router.weight.normal_(0, 1.0)
        for name, param in moe.named_parameters():  # GPT-2's LayerNorm biases would give every token one offset
            if ".ln_" in name and name.endswith("bias"):
                param.zero_()
    ids = tokenizer("Sword of Fire and Ice, Llanowar Elves")["input_ids"]
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs.__setitem__(mod.layer_index, args[0].detach()))
             for m in moe.modules() if isinstance(m, MoELayer)]
    trace = trace_text(moe, tokenizer, ids)
    for hook in hooks:
        hook.remove()
    layers = {m.layer_index: m for m in moe.modules() if isinstance(m, MoELayer)}
    assert trace.moe_layers == sorted(layers)
    for position, index in enumerate(trace.moe_layers):
        x = inputs[index].reshape(-1, inputs[index].shape[-1]).double()
        probs = torch.softmax(x @ layers[index].router.weight.double().T, dim=-1)
        torch.testing.assert_close(torch.tensor(trace.probs[position], dtype=torch.float64), probs, atol=1e-5, rtol=0)
        shown_top1 = [experts[0] for experts in trace.experts[position]]
        assert shown_top1 == probs.argmax(-1).tolist()
        assert len(set(shown_top1)) > 1  # the check above sees real choices, not one expert everywhere
    with torch.no_grad():
        logits = moe(torch.tensor([ids])).logits[0].double()
    expected = torch.log_softmax(logits, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert trace.logprobs[0] is None
    torch.testing.assert_close(torch.tensor(trace.logprobs[1:], dtype=torch.float64), expected, atol=1e-4, rtol=0)
    assert "".join(trace.tokens) == tokenizer.decode(ids)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_maps_equal_hf_eager_attention_of_the_dense_source(family):
    tokenizer = make_tokenizer()
    dense, moe = dense_and_moe(family, len(tokenizer))
    ids = tokenizer("the quick brown fox jumps over the lazy dog")["input_ids"]
    with torch.no_grad():
        reference = dense(torch.tensor([ids]), output_attentions=True).attentions  # per layer (1, H, T, T)
    maps = attention_maps(moe, ids)
    assert len(maps) == len(reference)
    for ours, theirs in zip(maps, reference):
        torch.testing.assert_close(ours, theirs[0].float(), atol=1e-5, rtol=1e-4)


# -- the server ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    tokenizer = make_tokenizer()
    _, moe = dense_and_moe("llama", len(tokenizer))
    moe.save_pretrained(root / "moe")
    tokenizer.save_pretrained(root / "moe")
    other_tokenizer = make_tokenizer(["a completely different corpus", "of other words entirely"])
    torch.manual_seed(1)
    GPT2LMHeadModel(tiny_gpt2_config(vocab_size=len(other_tokenizer))).save_pretrained(root / "other")
    other_tokenizer.save_pretrained(root / "other")
    run = _write_run(root / "run", _synthetic_records())
    state = Studio([str(root / "moe"), str(root / "other"), str(root / "missing")], [str(run)])
    state.load_all()
    return state


@pytest.fixture(scope="module")
def client(studio):
    return TestClient(create_app(studio))


def generate(client, **body):
    response = client.post("/api/generate", json={"model": 0, "prompt": "Sword of", "max_new_tokens": 8, **body})
    if response.status_code != 200:
        return response.status_code, response.json()
    events = [json.loads(line) for line in response.text.splitlines()]
    return 200, events


def test_generate_streams_text_then_the_trace_of_every_token(client, studio):
    status, events = generate(client, temperature=0, seed=0)
    assert status == 200 and events[-1]["type"] == "done"
    done = events[-1]
    pieces = "".join(e["text"] for e in events if e["type"] == "piece")
    assert pieces == done["text"]
    slot = studio.slots[0]
    ids = slot.tokenizer("Sword of", add_special_tokens=False)["input_ids"]
    assert done["trace"]["token_ids"][: len(ids)] == ids and done["prompt_tokens"] == len(ids)
    expected = trace_text(slot.model, slot.tokenizer, done["trace"]["token_ids"])
    assert done["trace"]["experts"] == expected.experts  # the same forward pass the test recomputes
    assert done["tokens_per_second"] > 0


@pytest.mark.parametrize("body, message", [
    (dict(model=7), "there is no model 7"),
    (dict(model=2), "missing is error"),
    (dict(temperature=-1), "temperature"),
    (dict(top_p=2), "top_p"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompt="Elves " * 400), "longer than"),
    (dict(card_type="Creature", card_colors="X"), "unknown colour"),
    (dict(temperature="hot"), "temperature"),
    (dict(temprature=0.1), "temprature: unknown field"),
    (dict(seed=2**64), "seed: Input should be less than or equal to"),
])
def test_bad_requests_get_a_message_and_the_server_keeps_serving(client, body, message):
    status, answer = generate(client, **body)
    assert status in (400, 422)
    assert message in json.dumps(answer)
    assert client.get("/api/state").status_code == 200


def test_compare_models_with_different_tokenizers_says_so(client):
    response = client.post("/api/compare", json={"models": [0, 1], "prompt": "Sword", "max_new_tokens": 4,
                                                 "temperature": 0})
    assert response.status_code == 200
    data = response.json()
    assert data["comparable"] is False and "different tokenizers" in data["message"]
    assert [run["model"] for run in data["runs"]] == ["moe", "other"]
    same = client.post("/api/compare", json={"models": [0, 0], "prompt": "Sword", "max_new_tokens": 4}).json()
    assert same["comparable"] is True and same["runs"][0]["text"] == same["runs"][1]["text"]  # same seed


def test_attention_and_memory_endpoints(client):
    data = client.post("/api/attention", json={"model": 0, "prompt": "Sword of Fire", "layer": 1}).json()
    n = len(data["tokens"])
    assert data["layers"] == 4 and len(data["maps"]) == 4 and len(data["maps"][0]) == n
    for row in data["maps"][0]:
        assert sum(row) == pytest.approx(1.0, abs=1e-3)
    assert client.post("/api/attention", json={"model": 0, "prompt": "x", "layer": 9}).status_code == 400
    # a transformers GPT-2 folder loads into our class (issue 45), so its attention maps are drawn too
    other = client.post("/api/attention", json={"model": 1, "prompt": "a different corpus", "layer": 0})
    assert other.status_code == 200 and all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in other.json()["maps"][0])
    assert client.get("/api/state").json()["models"][1]["note"] is None
    memory = client.post("/api/attention_memory", json={"model": 0, "length": 2048}).json()
    assert memory["eager"] > memory["flash"]  # eager holds 4 x 2048 x 2048 fp32 scores (64 MiB), flash none
    assert client.post("/api/attention_memory", json={"model": 0, "length": 10**6}).status_code == 400


def test_no_request_reads_files_it_was_not_given(client):
    assert client.get("/static/app.js").status_code == 200
    for path in ("/static/../app.py", "/static/%2e%2e%2fapp.py", "/static/index.html", "/api/runs/0/../../x.png",
                 "/api/runs/5/loss.png", "/api/runs/0/passwd.png"):
        assert client.get(path).status_code in (400, 404, 422), path
    png = client.get("/api/runs/0/loss.png")
    assert png.status_code == 200 and png.content[:8] == b"\x89PNG\r\n\x1a\n"


# -- the page in a real browser --------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
HAS_PLAYWRIGHT = importlib.util.find_spec("playwright") is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def browser_page(*studio_arguments: str):
    """`flash-experts studio ARGUMENTS` on a free port and a headless Chromium page (Playwright): yields
    (page, base URL); the browser and the server are stopped afterwards."""
    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "flash_experts.cli.main", "studio", *studio_arguments,
                               "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(240):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.25)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                yield browser.new_page(viewport={"width": 1200, "height": 900}), f"http://127.0.0.1:{port}"
            finally:
                browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.skipif(CHROMIUM is None or not HAS_PLAYWRIGHT,
                    reason="needs Debian's chromium (apt-get install chromium) and the playwright package")
def test_page_generates_and_colours_tokens_in_headless_chromium(studio, tmp_path):
    """Starts `flash-experts studio` on a free port, lets the page generate (autorun) in headless Chromium
    driven by Playwright, reads the coloured tokens from the DOM (each the expert the server's trace shows),
    clicks one for its router probabilities, and checks the screenshot is not blank."""
    with browser_page(studio.slots[0].source) as (page, url):
        page.goto(f"{url}/?prompt=Sword%20of&autorun=1&temperature=0&max_new_tokens=6")
        page.wait_for_selector(".tok[data-expert]", timeout=120_000)
        shown = page.eval_on_selector_all(".tok", "spans => spans.map(s => [Number(s.dataset.id), "
                                                  "Number(s.dataset.expert), s.style.background])")
        page.click(".tok[data-token='1']")
        probabilities = page.inner_text("#gen-probs")
        page.screenshot(path=str(tmp_path / "page.png"))
    slot = studio.slots[0]
    prompt = slot.tokenizer("Sword of", add_special_tokens=False)["input_ids"]
    token_ids = [token for token, _, _ in shown]
    assert len(token_ids) > len(prompt) and token_ids[: len(prompt)] == prompt
    trace = trace_text(slot.model, slot.tokenizer, token_ids)  # the router's top-1 of the first MoE layer
    assert [expert for _, expert, _ in shown] == [experts[0] for experts in trace.experts[0]]
    assert all(background for _, _, background in shown)  # every token coloured
    assert "layer" in probabilities and len(probabilities.split()) > 4
    import matplotlib.image

    pixels = matplotlib.image.imread(tmp_path / "page.png")
    assert pixels.shape[0] > 100 and pixels.std() > 0.02  # not a blank page


def test_run_atlas_is_served_from_the_run_folder(client, studio):
    """Reference: the atlas file as written (atlas_from_assignments on a hand-made text, saved as the demo
    saves it); a run without one gets one message, and the server keeps serving."""
    from flash_experts.evaluation.expert_atlas import atlas_from_assignments

    run = studio.runs[0]
    missing = client.get("/api/runs/0/atlas")
    assert missing.status_code == 400 and "has no expert_atlas.json" in missing.json()["error"]
    atlas = atlas_from_assignments([5, 6, 5, 7], {1: [[0], [1], [0], [1]]}, 2, lambda ids: "".join(map(str, ids)),
                                   min_count=1)
    (run / "expert_atlas.json").write_text(json.dumps(atlas.as_dict()))
    try:
        served = client.get("/api/runs/0/atlas")
        assert served.status_code == 200 and served.json() == json.loads(json.dumps(atlas.as_dict()))
        assert client.get("/api/runs/3/atlas").status_code == 400
        # valid JSON that is no atlas: 400 with a line naming what does not fit, and the server keeps serving
        good = atlas.as_dict()
        broken_expert = json.loads(json.dumps(good))
        broken_expert["layers"][0]["experts"][0]["share"] = "half"
        for bad, words in (([1, 2], "holds no object"), ({"layers": "x", "tokens": 4, "min_count": 1}, "layers must"),
                           ({"layers": []}, "tokens and min_count"), (broken_expert, "layers[0].experts[0]")):
            (run / "expert_atlas.json").write_text(json.dumps(bad))
            answer = client.get("/api/runs/0/atlas")
            assert answer.status_code == 400 and "not an expert atlas" in answer.json()["error"], bad
            assert words in answer.json()["error"]
        assert client.get("/api/runs/3/atlas").status_code == 400
    finally:
        (run / "expert_atlas.json").unlink()


@pytest.mark.skipif(CHROMIUM is None or not HAS_PLAYWRIGHT,
                    reason="needs Debian's chromium (apt-get install chromium) and the playwright package")
def test_page_shows_the_atlas_and_an_experts_tokens_in_headless_chromium(studio, tmp_path):
    """The Runs tab in a real browser: the atlas table has one row per expert of the chosen layer, with the
    shares and lifts of the file (the reference: atlas_from_assignments on a hand-made text), and clicking an
    expert shows its top token highlighted in its contexts."""
    from flash_experts.evaluation.expert_atlas import atlas_from_assignments

    run = studio.runs[0]
    atlas = atlas_from_assignments([5, 6, 5, 7, 5, 6], {1: [[0], [1], [0], [1], [1], [1]]}, 2,
                                   lambda ids: "".join(f" w{i}" for i in ids), min_count=1, window=1)
    (run / "expert_atlas.json").write_text(json.dumps(atlas.as_dict()))
    try:
        with browser_page(studio.slots[0].source, "--run", str(run)) as (page, url):
            page.goto(f"{url}/")
            page.click("nav button[data-tab='runs']")
            page.wait_for_selector(".atlas-row", timeout=60_000)
            rows = page.eval_on_selector_all(".atlas-row", "rows => rows.map(r => r.innerText)")
            page.click(".atlas-row[data-expert='0']")
            marked = page.eval_on_selector_all("#atlas-examples mark", "marks => marks.map(m => m.textContent)")
            page.screenshot(path=str(tmp_path / "atlas.png"))
    finally:
        (run / "expert_atlas.json").unlink()
    assert len(rows) == 2 and "33.3%" in rows[0] and "66.7%" in rows[1]
    assert "x2.0" in rows[0] and "x1.5" in rows[1]
    assert marked == [" w5", " w5"]  # expert 0's top token, at both places it took it


ELVES = "Llanowar Elves {G}\nCreature — Elf Druid\n{T}: Add {G} to your mana pool.\n1/1"


def test_a_card_is_drawn_field_by_field_with_the_routers_own_experts(client, studio):
    """Reference: the document's own lines (every token's text lies inside its field's text), the grammar's
    verdict (`judge`), the studio's trace of the same tokens (top-1 experts), and the field atlas recomputed
    here from the joint counts in float64."""
    import math

    from flash_experts.data.tokens import document_start_ids
    from flash_experts.mtg.card_grammar import judge

    response = client.post("/api/card", json={"model": 0, "document": ELVES})
    assert response.status_code == 200, response.text
    card = response.json()
    assert card["verdict"] == {k: v for k, v in vars(judge(ELVES, studio.card_vocabulary)).items() if k != "card"}
    assert card["card"] == {"name": "Llanowar Elves", "cost": "{G}", "type": "Creature — Elf Druid",
                            "text": ["{T}: Add {G} to your mana pool."], "pt": "1/1"}
    fields = {"name": "Llanowar Elves", "cost": " {G}\n", "type": "Creature — Elf Druid\n",
              "text": "{T}: Add {G} to your mana pool.\n", "pt": "1/1"}
    tokens = card["tokens"]
    # first the document boundary every training document has before it (data/tokens.py's document_start_ids)
    start = document_start_ids(studio.slots[0].tokenizer)
    assert [t["id"] for t in tokens[:len(start)]] == start and all(t["field"] is None for t in tokens[:len(start)])
    assert "".join(t["text"] for t in tokens[len(start):]) == ELVES
    for field, text in fields.items():
        assert "".join(t["text"] for t in tokens if t["field"] == field).strip() == text.strip(), field
    slot = studio.slots[0]
    trace = trace_text(slot.model, slot.tokenizer, [t["id"] for t in tokens])
    assert card["experts"] == [[choices[0] for choices in layer] for layer in trace.experts]
    for position, layer in enumerate(card["atlas"]):
        pairs = [(t["field"], card["experts"][position][i]) for i, t in enumerate(tokens) if t["field"]]
        joint = {pair: pairs.count(pair) / len(pairs) for pair in set(pairs)}
        field_p = {f: sum(p for (g, _), p in joint.items() if g == f) for f, _ in joint}
        expert_p = {e: sum(p for (_, x), p in joint.items() if x == e) for _, e in joint}
        information = sum(p * math.log2(p / (field_p[f] * expert_p[e])) for (f, e), p in joint.items())
        assert layer["information_bits"] == pytest.approx(information, abs=1e-12)
        assert layer["information_bits"] <= layer["field_entropy_bits"] + 1e-12
        assert sum(layer["tokens"].values()) == len(pairs)


@pytest.mark.parametrize(("body", "message"), [
    ({"model": 0, "document": "x" * 3000}, "up to 2000"),
    ({"model": 5, "document": ELVES}, "there is no model 5"),
    # issue 44's probes: an unknown field ran with the defaults; a seed torch cannot take answered with its overflow
    ({"model": 0, "document": ELVES, "temprature": 0.1}, "temprature: unknown field"),
    ({"model": 0, "seed": 10**30}, "seed: Input should be less than or equal to 9223372036854775807"),
    ({"model": 0, "seed": -1}, "seed: Input should be greater than or equal to 0"),
])
def test_bad_card_requests_get_a_message(client, body, message):
    response = client.post("/api/card", json=body)
    assert response.status_code in (400, 422) and message in response.json()["error"]
    assert client.get("/api/state").status_code == 200


def test_a_card_that_breaks_the_grammar_says_which_rule(client):
    response = client.post("/api/card", json={"model": 0, "document": "Shock {R}\nInstant\n~ deals 2 damage.\n2/2"})
    assert response.status_code == 200
    verdict = response.json()["verdict"]
    assert verdict["parses"] and not verdict["passes"] and "pt" in verdict["failures"]


@pytest.mark.skipif(CHROMIUM is None or not HAS_PLAYWRIGHT,
                    reason="needs Debian's chromium (apt-get install chromium) and the playwright package")
def test_page_draws_a_card_in_headless_chromium(studio, tmp_path):
    """The Card tab (its element ids unique on the page: an id the Generate tab also used hid the type line):
    the card's fields in their boxes, every token coloured by the expert the server traced, the
    grammar's verdict, the field atlas; the Runs tab says its plots are being drawn until they arrive."""
    with browser_page(studio.slots[0].source, "--run", str(studio.runs[0])) as (page, url):
        page.goto(url)
        page.wait_for_function("document.querySelector('#card-model option:not([disabled])') !== null",
                               timeout=120_000)
        page.click("nav button[data-tab='card']")
        page.click("#card-run")
        page.wait_for_selector("#card-frame:not([hidden]) .tok[data-expert]", timeout=120_000)
        name = page.inner_text("#card-name")
        type_line = page.inner_text("#card-typeline")
        pt = page.inner_text("#card-pt")
        colours = page.eval_on_selector_all(".mtg-card .tok", "spans => spans.map(s => s.style.background)")
        verdict = page.inner_text("#card-verdict")
        atlas = page.inner_text("#card-atlas")
        page.screenshot(path=str(tmp_path / "card.png"))
        page.click("nav button[data-tab='runs']")
        drawing = page.locator("#plots-drawing")
        page.wait_for_selector("#run-plots img", timeout=60_000)
        drawing.wait_for(state="detached", timeout=120_000)  # gone once a plot arrives
    assert name.replace("\n", "").strip() == "Llanowar Elves" and pt.strip() == "1/1"
    assert type_line.replace("\n", "").strip() == "Creature — Elf Druid"
    assert colours and all(colours)
    assert "parses" in verdict or "passes" in verdict
    assert "I(field; expert)" in atlas and "name" in atlas


def test_the_page_names_each_element_once():
    """Reference: the page's own markup. app.js finds elements by id; a second element with the same id is never
    found (the Card tab's type line once went into the Generate tab's input of the same id)."""
    import re
    from pathlib import Path

    from flash_experts.studio import app as studio_app

    ids = re.findall(r'\bid="([^"]+)"', (Path(studio_app.__file__).parent / "static" / "index.html").read_text())
    assert ids and len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
