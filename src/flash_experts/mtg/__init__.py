"""The Magic: The Gathering card-name domain in one place: card records (MTGJSON and Arena catalogs), their
text formats, card-name cleaning, name generation and the name metrics. Generation and evaluation stay
generic; this package uses them."""

from flash_experts.mtg.cards import (
    CardRecord,
    conditioning_prefix,
    format_card,
    load_mtg_records,
    mtg_documents,
    parse_card_text,
    read_mtg_source,
    split_for_name,
    split_records,
)
from flash_experts.mtg.cleaning import CARD_NAME_REGEX, clean_card_name, is_valid_card_name, title_case_card_name

# Name generation imports torch: loaded on first use, so that the CLI's parser (which reads the name sampling
# defaults from mtg.cleaning) starts without it.
_NAMES = ("NameMetrics", "evaluate_names", "generate_card_names")


def __getattr__(name: str):
    if name in _NAMES:
        from flash_experts.mtg import names

        return getattr(names, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "CARD_NAME_REGEX",
    "CardRecord",
    "NameMetrics",
    "clean_card_name",
    "conditioning_prefix",
    "evaluate_names",
    "format_card",
    "generate_card_names",
    "is_valid_card_name",
    "load_mtg_records",
    "mtg_documents",
    "parse_card_text",
    "read_mtg_source",
    "split_for_name",
    "split_records",
    "title_case_card_name",
]
