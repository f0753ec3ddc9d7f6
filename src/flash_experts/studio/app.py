"""`flash-experts studio`: a local page that shows the experts and the attention at work (FastAPI + one page).

The server knows only what the command line gave it: models and run folders, each addressed by its index in
those lists. No request names a path, so none can read a file outside them. Every model-facing function
answers bad input with a message (HTTP 400, or an error line in a stream); the server keeps serving.
Models load in a background thread; until one is ready the page says it is loading.
"""

from __future__ import annotations

import json
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from flash_experts.contest.seeds import MAX_SEED
from flash_experts.errors import UserError
from flash_experts.studio.attention_memory import measure_attention_memory
from flash_experts.studio.trace import attention_maps, trace_text

STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"app.js": "text/javascript", "app.css": "text/css"}  # the only files served besides the page
MAX_ATTENTION_TOKENS = 96  # heatmaps of longer prompts would be unreadable and heavy to send
MAX_CARD_CHARACTERS = 2000  # the longest real card document is under 900
MAX_MEMORY_LENGTH = 16384  # eager attention's scores at 16k and 32 heads are 32 GiB: the machine's limit, not ours
PLOTS = ("loss", "loss_vs_tokens", "lr", "expert_load", "expert_load_time", "router")


@dataclass
class ModelSlot:
    name: str
    source: str
    status: str = "waiting"  # waiting | loading | ready | error
    error: str | None = None
    note: str | None = None  # why the model runs as transformers' class, when it does
    model: Any = None
    tokenizer: Any = None
    info: dict = field(default_factory=dict)


class StudioRequest(BaseModel):
    """Every request body: a field the endpoint does not know is refused (a misspelt "temprature" would otherwise
    run with the default, silently)."""

    model_config = ConfigDict(extra="forbid")


Seed = Field(default=0, ge=0, le=MAX_SEED)  # what torch and numpy take (contest/seeds.py), None: unseeded


class Sampling(StudioRequest):
    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_new_tokens: int = 40
    seed: int | None = Seed


class GenerateRequest(Sampling):
    model: int = 0
    prompt: str = ""
    card_type: str | None = None  # card-name mode: the conditioned format's "type | colours |" prefix
    card_colors: str | None = None


class CompareRequest(Sampling):
    models: list[int] = Field(default_factory=lambda: [0, 1])
    prompt: str = ""


class CardRequest(StudioRequest):
    model: int = 0
    document: str = ""  # a whole card (mtg/whole_cards.py's layout); empty: the model writes one
    seed: int | None = Seed
    temperature: float = 0.8


class AttentionRequest(StudioRequest):
    model: int = 0
    prompt: str = ""
    layer: int = 0
    length: int | None = None  # the memory panel's length (default: the prompt's)


class Studio:
    """The state behind the page: the model slots (loaded in the background), the run folders, one lock so that
    one model call runs at a time (they share the CPU)."""

    def __init__(self, sources: list[str], runs: list[str], device: str = "cpu"):
        self.slots = [ModelSlot(name=Path(s).name or s, source=s) for s in sources]
        self.runs = [Path(r) for r in runs]
        self.device = device
        self.lock = threading.Lock()
        self._plots: dict[tuple[int, str], bytes] = {}
        self._card_vocabulary = None

    @property
    def card_vocabulary(self):  # noqa: ANN201
        """The subtypes of the real cards (the offline MTGJSON when cached; without it, none is known)."""
        if self._card_vocabulary is None:
            from flash_experts.mtg.card_grammar import CardVocabulary
            from flash_experts.mtg.whole_cards import load_offline_whole_cards

            try:
                self._card_vocabulary = CardVocabulary.from_cards(load_offline_whole_cards(fetch=False))
            except (UserError, OSError):
                self._card_vocabulary = CardVocabulary({})
        return self._card_vocabulary

    def load_all(self) -> None:
        from flash_experts.model.loading import load_model
        from flash_experts.model.upcycle import in_our_classes

        for slot in self.slots:
            slot.status = "loading"
            try:
                model, tokenizer = load_model(slot.source)
                if tokenizer is None:
                    raise UserError("no tokenizer beside the model")
                # our class where it computes the same logits: our attention (its maps), cache and traces apply
                model, slot.note = in_our_classes(model)
                slot.model, slot.tokenizer = model.to(self.device).eval(), tokenizer
                slot.info = model_info(model, tokenizer)
                slot.status = "ready"
            except Exception as error:  # noqa: BLE001 (a page message, never a dead server)
                slot.status, slot.error = "error", f"{type(error).__name__}: {error}" if not isinstance(
                    error, UserError) else str(error)

    def slot(self, index: int) -> ModelSlot:
        if not 0 <= index < len(self.slots):
            raise UserError(f"there is no model {index}: the studio was started with {len(self.slots)}")
        slot = self.slots[index]
        if slot.status != "ready":
            raise UserError(f"{slot.name} is {slot.status}" + (f": {slot.error}" if slot.error else ""))
        return slot

    def run_plot(self, index: int, kind: str) -> bytes:
        if not 0 <= index < len(self.runs):
            raise UserError(f"there is no run {index}: the studio was started with {len(self.runs)}")
        if kind not in PLOTS:
            raise UserError(f"unknown plot {kind!r}; one of {', '.join(PLOTS)}")
        if (index, kind) not in self._plots:
            from flash_experts.training.plots import plot_run

            with tempfile.TemporaryDirectory() as folder:  # the run folder itself is never written to
                for path in plot_run(self.runs[index], folder):
                    self._plots[(index, path.stem)] = path.read_bytes()
        if (index, kind) not in self._plots:
            raise UserError(f"{self.runs[index].name} has no metrics for the {kind} plot")
        return self._plots[(index, kind)]


    def run_atlas(self, index: int) -> dict:
        """The expert atlas a run's folder holds (the demo writes it beside the MoE run's metrics)."""
        from flash_experts.evaluation.expert_atlas import ATLAS_FILE, ExpertAtlas

        if not 0 <= index < len(self.runs):
            raise UserError(f"there is no run {index}: the studio was started with {len(self.runs)}")
        path = self.runs[index] / ATLAS_FILE
        if not path.is_file():
            raise UserError(f"{self.runs[index].name} has no {ATLAS_FILE} (the demo writes one for its MoE run; "
                            "`flash-experts evaluate MODEL --router-stats --json FILE` computes one for any text)")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as error:
            raise UserError(f"{path} is not an expert atlas ({error})") from None
        try:
            return ExpertAtlas.from_dict(data).as_dict()  # valid JSON of another shape: 400 with a line, not 500
        except UserError as error:
            raise UserError(f"{path}: {error}") from None


def model_info(model, tokenizer) -> dict:  # noqa: ANN001
    from flash_experts.model.properties import model_max_positions
    from flash_experts.model.routing import moe_layers_of

    layers = moe_layers_of(model)
    config = model.config
    return {
        "type": config.model_type, "parameters": sum(p.numel() for p in model.parameters()),
        "moe_layers": [layer.layer_index for layer in layers],
        "num_experts": layers[0].num_experts if layers else 0, "top_k": layers[0].top_k if layers else 0,
        "max_positions": model_max_positions(model), "vocab": len(tokenizer),
        "heads": config.num_attention_heads,  # GPT-2 configs map these names onto n_head / n_embd
        "head_dim": getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        "attention_maps": type(model).__module__.startswith("flash_experts."),
    }


def sampling_config(request: Sampling):
    from flash_experts.generation.sampling import SamplingConfig

    if not 1 <= request.max_new_tokens <= 1024:
        raise UserError(f"max_new_tokens must be between 1 and 1024, got {request.max_new_tokens}")
    return SamplingConfig(temperature=request.temperature, top_k=request.top_k, top_p=request.top_p,
                          min_p=request.min_p, repetition_penalty=request.repetition_penalty,
                          no_repeat_ngram_size=request.no_repeat_ngram_size)


def prompt_ids(slot: ModelSlot, prompt: str, max_new_tokens: int = 0) -> list[int]:
    from flash_experts.evaluation.lm_eval_task import prefix_token_id

    ids = slot.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if not ids:  # an empty prompt starts from the tokenizer's BOS (else EOS), as generation does
        ids = [prefix_token_id(slot.tokenizer)]
    limit = slot.info["max_positions"]
    if limit is not None and len(ids) + max_new_tokens > limit:
        raise UserError(f"the prompt ({len(ids)} tokens) plus {max_new_tokens} new tokens is longer than "
                        f"{slot.name}'s {limit} positions")
    return ids


def generate_and_trace(studio: Studio, slot: ModelSlot, ids: list[int], config, request: Sampling,  # noqa: ANN001
                       on_piece=None) -> dict:  # noqa: ANN001
    """Generate from the checked prompt `ids` with the checked sampling `config` (streaming pieces of text to
    `on_piece`), then trace prompt + generated tokens in one forward."""
    from flash_experts.generation.generate import generate

    with studio.lock:
        start = time.perf_counter()
        result = generate(slot.model, slot.tokenizer, torch.tensor([ids]), config, request.max_new_tokens,
                          seed=request.seed, stream=(lambda pieces: on_piece(pieces[0])) if on_piece else None)
        seconds = time.perf_counter() - start
        new_ids = result.token_ids[0]
        trace = trace_text(slot.model, slot.tokenizer, ids + new_ids)
    return {"model": slot.name, "prompt_tokens": len(ids), "text": result.texts[0],
            "finish_reason": result.finish_reasons[0], "new_tokens": len(new_ids),
            "tokens_per_second": len(new_ids) / seconds if seconds > 0 else None, "trace": trace.as_dict()}


def create_app(studio: Studio) -> FastAPI:
    app = FastAPI(title="flash-experts studio", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(UserError)
    async def user_error(request, error: UserError):  # noqa: ANN001
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(ValueError)
    async def value_error(request, error: ValueError):  # noqa: ANN001 (ConfigError and torch's own)
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request, error: RequestValidationError):  # noqa: ANN001
        """A body that does not fit its request type: one line naming each field and what is wrong (the page
        shows "error" as every other refusal), status 422."""
        problems = ["{}: {}".format(".".join(str(part) for part in item["loc"] if part != "body") or "body",
                                    "unknown field" if item["type"] == "extra_forbidden" else item["msg"])
                    for item in error.errors()]
        return JSONResponse({"error": "; ".join(problems)}, status_code=422)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return (STATIC / "index.html").read_text(encoding="utf-8")

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404)
        return Response((STATIC / name).read_bytes(), media_type=STATIC_FILES[name])

    @app.get("/api/state")
    def state() -> dict:
        return {"models": [{"id": i, "name": s.name, "status": s.status, "error": s.error, "note": s.note, **s.info}
                           for i, s in enumerate(studio.slots)],
                "runs": [{"id": i, "name": r.name} for i, r in enumerate(studio.runs)]}

    @app.post("/api/generate")
    def generate_stream(request: GenerateRequest) -> StreamingResponse:
        slot = studio.slot(request.model)
        prompt = request.prompt
        if request.card_type or request.card_colors:
            from flash_experts.mtg.cards import conditioning_prefix

            prompt = conditioning_prefix(request.card_type, request.card_colors or None)
        config, ids = sampling_config(request), prompt_ids(slot, prompt, request.max_new_tokens)  # before streaming
        events: queue.Queue = queue.Queue()

        def work() -> None:
            try:
                done = generate_and_trace(studio, slot, ids, config, request,
                                          on_piece=lambda piece: events.put({"type": "piece", "text": piece}))
                events.put({"type": "done", **done})
            except Exception as error:  # noqa: BLE001
                events.put({"type": "error", "error": str(error)})
            events.put(None)

        threading.Thread(target=work, daemon=True).start()

        def lines():
            while (event := events.get()) is not None:
                yield json.dumps(event) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/api/compare")
    def compare(request: CompareRequest) -> dict:
        if len(request.models) != 2:
            raise UserError("compare takes two models")
        slots = [studio.slot(i) for i in request.models]
        config = sampling_config(request)
        prompts = [prompt_ids(slot, request.prompt, request.max_new_tokens) for slot in slots]  # both checked first
        runs = [generate_and_trace(studio, slot, ids, config, request) for slot, ids in zip(slots, prompts)]
        same_vocabulary = slots[0].tokenizer.get_vocab() == slots[1].tokenizer.get_vocab()
        message = None if same_vocabulary else (
            f"{slots[0].name} and {slots[1].name} use different tokenizers: their texts are shown, but tokens, "
            f"log-probabilities and routing cannot be lined up one to one")
        return {"runs": runs, "comparable": same_vocabulary, "message": message}

    @app.post("/api/attention")
    def attention(request: AttentionRequest) -> dict:
        slot = studio.slot(request.model)
        if not slot.info["attention_maps"]:
            raise UserError(f"{slot.name} is not one of this package's models: its attention is not recorded")
        ids = prompt_ids(slot, request.prompt)
        if len(ids) > MAX_ATTENTION_TOKENS:
            raise UserError(f"attention maps are drawn for up to {MAX_ATTENTION_TOKENS} tokens; the prompt has "
                            f"{len(ids)}")
        with studio.lock:
            maps = attention_maps(slot.model, ids)
        if not 0 <= request.layer < len(maps):
            raise UserError(f"layer {request.layer} does not exist: the model has {len(maps)}")
        heads = [[[round(p, 4) for p in row] for row in head] for head in maps[request.layer].tolist()]
        return {"tokens": [slot.tokenizer.decode([t]) for t in ids], "layers": len(maps), "layer": request.layer,
                "maps": heads}

    @app.post("/api/attention_memory")
    def attention_memory(request: AttentionRequest) -> dict:
        slot = studio.slot(request.model)
        length = request.length or len(prompt_ids(slot, request.prompt))
        # The attention of this model's shape (heads, head size) at any length up to 16k: what the saving would
        # be, also past the positions this model was trained for.
        if not 1 <= length <= MAX_MEMORY_LENGTH:
            raise UserError(f"length must be between 1 and {MAX_MEMORY_LENGTH}, got {length}")
        with studio.lock:
            return measure_attention_memory(slot.info["heads"], length, slot.info["head_dim"], studio.device)

    @app.post("/api/card")
    def card(request: CardRequest) -> dict:
        from flash_experts.data.tokens import document_start_ids
        from flash_experts.generation.generate import generate
        from flash_experts.generation.sampling import SamplingConfig
        from flash_experts.studio.card_view import card_view

        slot = studio.slot(request.model)
        document = request.document.strip()
        if len(document) > MAX_CARD_CHARACTERS:
            raise UserError(f"a card of {len(document)} characters: the studio draws cards up to {MAX_CARD_CHARACTERS}")
        start = document_start_ids(slot.tokenizer)
        with studio.lock:
            if not document:  # the model writes one from a document boundary, as every card begins in training
                written = generate(slot.model, slot.tokenizer, torch.tensor([start]),
                                   SamplingConfig(temperature=request.temperature), 160, seed=request.seed)
                document = written.texts[0].strip()
                if not document:
                    raise UserError(f"{slot.name} wrote an empty card; try another seed")
            length = len(start) + len(slot.tokenizer(document, add_special_tokens=False)["input_ids"])
            limit = slot.info["max_positions"]
            if limit is not None and length > limit:
                raise UserError(f"the card is {length} tokens, longer than {slot.name}'s {limit} positions")
            return card_view(document, slot.tokenizer, lambda ids: trace_text(slot.model, slot.tokenizer, ids),
                             studio.card_vocabulary, start, slot.info["num_experts"])

    @app.get("/api/runs/{index}/atlas")
    def run_atlas(index: int) -> dict:
        return studio.run_atlas(index)

    @app.get("/api/runs/{index}/{kind}.png")
    def run_plot(index: int, kind: str) -> Response:
        return Response(studio.run_plot(index, kind), media_type="image/png")

    return app


def serve(sources: list[str], runs: list[str], host: str, port: int, device: str = "cpu") -> None:
    import uvicorn

    studio = Studio(sources, runs, device)
    threading.Thread(target=studio.load_all, daemon=True).start()
    print(f"flash-experts studio on http://{host}:{port}/ (Ctrl-C stops it)", flush=True)
    uvicorn.run(create_app(studio), host=host, port=port, log_level="warning")

