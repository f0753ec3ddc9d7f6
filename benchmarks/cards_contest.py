"""Whole cards at equal compute: the dense base against its upcycle, fine-tuned on card documents on the contest
engine, then measured as issue 37 asks (docs/CARDS.md holds the figures).

    python benchmarks/cards_contest.py [--tokens 90112] [--cards 200] [--out runs/cards_contest] [--resume] [--judge-again] [--quick]

1. the card documents (mtg/whole_cards.py) tokenised with the base's tokenizer (SmolLM2-135M offline);
2. both fine-tuned by the trainer in turns on the same batches to the same training FLOPs (the main job's
   recipe: 4 experts, top-1, every other layer; contest/upcycling.py), every step timed;
3. from each best checkpoint: the validation loss per field (name, cost, type line, rules text, P/T; every
   validation card, each token's loss given the card so far), then `--cards` cards sampled and judged by the card
   grammar: parse rate, pass rate, unique and new names; ten cards printed. The test split is not read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import common  # noqa: E402, F401  (the command line's process settings, before torch loads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=88 * 8 * 128, help="the budget in the dense model's tokens")
    parser.add_argument("--cards", type=int, default=200, help="cards sampled from each model (default 200)")
    parser.add_argument("--out", default="runs/cards_contest", help="folder for the data, the runs and the JSON")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--resume", action="store_true",
                        help="continue the runs in --out (finished runs are measured again, not retrained)")
    parser.add_argument("--judge-again", action="store_true",
                        help="judge the cards of --out's cards_contest.json again with today's grammar (no model runs)")
    parser.add_argument("--quick", action="store_true", help="a few steps and cards: checks the pipeline")
    args = parser.parse_args(argv)
    for name in ("tokens", "cards"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    from flash_experts.data.tokens import check_output_folder

    check_output_folder(args.out)  # it, or a folder above it, a file: one line before any work
    if args.quick:
        args.tokens, args.cards = 4 * 8 * 128, 4  # and 40 validation cards for the losses per field
    return args


def field_losses(model, tokenizer, documents: list[str]) -> dict[str, float]:
    """Mean next-token loss (nats) of the tokens of each field over `documents`, each card scored after a
    document boundary as it has in training (data/tokens.py's document_start_ids)."""
    from flash_experts.data.tokens import document_start_ids
    from flash_experts.studio.card_view import FIELDS, token_pieces

    sums = {field: 0.0 for field in FIELDS}
    counts = {field: 0 for field in FIELDS}
    start = document_start_ids(tokenizer)
    model.eval()
    with torch.no_grad():
        for document in documents:
            ids, _, fields = token_pieces(tokenizer, document)
            tokens = torch.tensor([[*start, *ids]])
            logits = model(input_ids=tokens).logits[0, len(start) - 1:-1].float()
            losses = torch.nn.functional.cross_entropy(logits, tokens[0, len(start):], reduction="none").tolist()
            for loss, field in zip(losses, fields):
                sums[field] += loss
                counts[field] += 1
    return {field: sums[field] / counts[field] for field in FIELDS if counts[field]}


def rates_line(batch) -> str:
    """A batch's parse, pass, unique and new rates, then its failed rules, on one line."""
    rates = batch.rates()
    return (f"{batch.samples} cards: parse {rates['parse']:.1%}, pass every rule check {rates['pass']:.1%}, "
            f"unique names {rates['unique']:.1%}, new names {rates['new']:.1%}; failed rules (cards): "
            + (", ".join(f"{rule} {count}" for rule, count in batch.failures_by_rule().items()) or "none"))


def judge_again(out: Path) -> int:
    """The saved cards of a finished run judged by the grammar as it is now (the grammar may have gained a rule
    since the run), written back beside the run's own verdicts."""
    from flash_experts.errors import UserError
    from flash_experts.mtg.card_generation import CardBatch, RealCards, judge_generated
    from flash_experts.mtg.card_grammar import CardVocabulary
    from flash_experts.mtg.whole_cards import load_offline_whole_cards

    path = out / "cards_contest.json"
    if not path.is_file():
        raise UserError(f"--judge-again: {out} holds no finished run ({path.name} is written at a run's end)")
    try:
        report = json.loads(path.read_text())
        saved = {name: [card["document"] for card in model["cards"]] for name, model in report["models"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{path} is not a cards contest report ({type(error).__name__}: {error}); run the contest "
                        "again") from None
    cards = load_offline_whole_cards()
    real, vocabulary = RealCards(cards), CardVocabulary.from_cards(cards)
    for name, model in report["models"].items():
        judged = [judge_generated(document, vocabulary, real) for document in saved[name]]
        batch = CardBatch(judged, len(judged), judged)
        model["rejudged"] = {"rates": batch.rates(), "failures_by_rule": batch.failures_by_rule()}
        print(f"{name}: {rates_line(batch)}")
    path.write_text(json.dumps(report, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.judge_again:
        return judge_again(Path(args.out))
    from flash_experts.contest.upcycling import UpcyclingSettings, plan_contest, run_config, train_contest
    from flash_experts.data.tokens import prepare_token_splits
    from flash_experts.model.loading import base_tokenizer, load_model
    from flash_experts.mtg.card_generation import RealCards, card_lines, generate_cards
    from flash_experts.mtg.card_grammar import CardVocabulary
    from flash_experts.mtg.whole_cards import load_offline_whole_cards, whole_card_documents

    started = time.perf_counter()
    out = Path(args.out)
    cards = load_offline_whole_cards()
    documents = whole_card_documents(cards)
    tokenizer = base_tokenizer("smollm2")
    data_dir = out / "data"
    prepare_token_splits(documents, tokenizer, data_dir, source="mtg cards", data_format="mtg-cards")
    settings = UpcyclingSettings(base="smollm2", tokens=args.tokens, block_size=128, seed=args.seed, wandb="off")
    settings.check()
    plan = plan_contest(settings, "smollm2", str(data_dir), out)
    configs = {name: run_config(settings, "smollm2", str(data_dir), out / name, moe=name == "moe",
                                steps=plan["steps"][name]) for name in ("dense", "moe")}
    print(f"budget {plan['budget'].as_dict()}; steps {plan['steps']}", flush=True)
    results, log = train_contest(configs, resume=args.resume)
    from flash_experts.contest.report import step_cost

    timed = all(log.step_seconds.get(name) for name in ("dense", "moe"))
    report = {"steps": plan["steps"], "flops_per_token": plan["flops_per_token"],
              "step_cost": str(step_cost(log.step_seconds["dense"], log.step_seconds["moe"])) if timed else
              "not timed in this run (resumed after the last step)", "models": {}}
    real = RealCards(cards)
    vocabulary = CardVocabulary.from_cards(cards)
    for name, result in results.items():
        model, tok = load_model(str(out / name / "best"))
        model.eval()
        losses = field_losses(model, tok, documents["val"][:40] if args.quick else documents["val"])
        batch = generate_cards(model, tok, args.cards, vocabulary, real=real, seed=args.seed, max_rounds=1,
                               batch_size=args.cards)
        report["models"][name] = {"best_val_loss": result.best_val_loss, "field_losses": losses,
                                  "rates": batch.rates(), "samples": batch.samples,
                                  "cards": [card.as_dict() for card in batch.cards]}
        print(f"\n== {name}: best validation loss {result.best_val_loss:.4f}; per field "
              + ", ".join(f"{field} {loss:.3f}" for field, loss in losses.items()), flush=True)
        report["models"][name]["failures_by_rule"] = batch.failures_by_rule()
        print(f"   {rates_line(batch)}")
        for card in batch.cards[:10]:
            print("\n".join(card_lines(card)))
        del model
    report["minutes"] = (time.perf_counter() - started) / 60
    print(f"\na MoE step's cost against a dense step: {report['step_cost']}; {report['minutes']:.1f} min in all")
    (out / "cards_contest.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    from flash_experts.errors import report_errors

    sys.exit(report_errors(main))
