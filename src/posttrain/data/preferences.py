"""Preference pairs for DPO: a prompt, a chosen and a rejected response, read from files,
directories or the hub (the layouts Hugging Face preference datasets use) or generated; tokenized
with the chat template so that exactly each response's turn is scored.

Row layouts (`PreferenceSource`'s keys; TRL calls these "preference" data):

    explicit prompt, text:            {"prompt": "Q", "chosen": "A", "rejected": "B"}
    explicit prompt, conversational:  {"prompt": [{"role": "user", "content": "Q"}],
                                       "chosen": [{"role": "assistant", "content": "A"}],
                                       "rejected": [{"role": "assistant", "content": "B"}]}
    implicit prompt (prompt_key null): {"chosen": [<prompt messages>, {"role": "assistant", "content": "A"}],
                                        "rejected": [<the same prompt messages>, {"role": "assistant", "content": "B"}]}

A prompt may hold several turns (system, user, assistant) but ends with a user message; each
response is one assistant message. A malformed row goes to the source's `BadRows` with its file
and 0-based row.

Tokenization. Each response is scored as an SFT reply would be supervised (chat.py): the prompt
rendered with the generation prompt (`...<|turn>model\\n`), then the tokens the response's turn
adds, its content up to and including its end-of-turn token (`85<turn|>`), are the scored ones.
Earlier assistant turns of a multi-turn prompt are context, never scored. The two sequences of a
pair share the prompt's tokens.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from posttrain.config.schema import ArithmeticPreferenceSource, PreferenceSource
from posttrain.data.arithmetic import arithmetic_problem, split_of
from posttrain.data.chat import TokenizedConversation, conversation_messages, read_rows, supervised_spans
from posttrain.data.sources import BadRows, DataError, column_value, convert_rows, first_rows


@dataclass(frozen=True)
class PreferencePair:
    """One preference: the prompt's messages (ending with a user message) and two replies to it."""

    prompt: list[dict[str, str]]
    chosen: str
    rejected: str
    origin: str  # where it came from, for error messages: "prefs.jsonl:17", "arithmetic_preferences:train:0:17"


# --------------------------------------------------------------------------------------- loading


def load_preferences(
    path: str,
    *,
    prompt_key: str | None = "prompt",
    chosen_key: str = "chosen",
    rejected_key: str = "rejected",
    split: str | None = None,
    limit: int | None = None,
    bad_rows: BadRows | None = None,
) -> list[PreferencePair]:
    """The preference pairs at `path`: a local .jsonl/.json/.parquet file (rows named "file row N"),
    or a local directory of such files or a hub id, read with `datasets.load_dataset(path,
    split=split or "train")` (rows named "path:split row N"). `prompt_key` None: the implicit-prompt
    layout (see the module docstring).

    Raises:
        DataError: nothing at `path`, a missing column, a malformed row (unless `bad_rows` skips
            it), or no rows.
    """
    dataset, source, origin = read_rows(path, split=split, what="preference data")
    columns = list(dataset.column_names)
    for role, key in (("prompt", prompt_key), ("chosen", chosen_key), ("rejected", rejected_key)):
        if key is not None and key not in columns and key.split(".", 1)[0] not in columns:
            hint = " (rows without a prompt column, chosen and rejected holding whole conversations: set prompt_key: null)"
            raise DataError(f"{source}: no {role} column {key!r}; columns present: {columns}{hint if role == 'prompt' else ''}")

    def convert(index: int, row: dict[str, Any]) -> PreferencePair:
        where = f"{source} row {index}"
        chosen, rejected = column_value(row, chosen_key, where=where), column_value(row, rejected_key, where=where)
        if prompt_key is None:
            prompt, chosen, rejected = _split_implicit_prompt(chosen, rejected, where=where, keys=(chosen_key, rejected_key))
        else:
            prompt = column_value(row, prompt_key, where=where)
        return preference_pair(prompt, chosen, rejected, where=where, keys=(prompt_key, chosen_key, rejected_key), origin=f"{origin}:{index}")

    return convert_rows(first_rows(dataset, limit), convert, bad_rows or BadRows(), source=source)


def preference_pair(prompt: Any, chosen: Any, rejected: Any, *, where: str, keys: tuple[str | None, str, str], origin: str) -> PreferencePair:
    """A checked pair from a row's prompt (a string or messages) and responses (a string or a
    list of one assistant message).

    Raises:
        DataError: naming `where` and the column: see `_prompt_messages` and `_response_text`.
    """
    prompt_key, chosen_key, rejected_key = keys
    messages = _prompt_messages(prompt, where=where, key=prompt_key or chosen_key)
    chosen_text = _response_text(chosen, where=where, key=chosen_key)
    rejected_text = _response_text(rejected, where=where, key=rejected_key)
    if chosen_text == rejected_text:
        raise DataError(f"{where}: {chosen_key!r} and {rejected_key!r} are the same response, which states no preference")
    return PreferencePair(prompt=messages, chosen=chosen_text, rejected=rejected_text, origin=origin)


def _prompt_messages(value: Any, *, where: str, key: str) -> list[dict[str, str]]:
    """A prompt string as one user message, or checked messages (chat.py's rules) ending with a user message."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: {key!r} is an empty prompt")
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a string or a non-empty list of {{role, content}} messages, got {value!r:.200}")
    # conversation_messages checks roles, contents and keys; a placeholder reply makes the prompt a conversation
    messages = conversation_messages([*value, {"role": "assistant", "content": "?"}], where=where, key=key)[:-1]
    if messages[-1]["role"] != "user":
        raise DataError(
            f"{where}: {key!r} must end with a user message, the one the responses answer "
            f"(roles: {[m['role'] for m in messages]})"
        )
    return messages


def _response_text(value: Any, *, where: str, key: str) -> str:
    """A response: a non-empty string, or a list holding one assistant message."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
        message = value[0]
        extra = sorted(name for name, v in message.items() if name not in ("role", "content") and v is not None)
        if message.get("role") != "assistant" or extra:
            raise DataError(f"{where}: {key!r} must hold one {{role: assistant, content}} message, got {value!r:.200}")
        value = message.get("content")
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string or a list of one assistant message, got {value!r:.200}")
    if not value.strip():
        raise DataError(f"{where}: {key!r} is an empty response")
    return value


def _split_implicit_prompt(chosen: Any, rejected: Any, *, where: str, keys: tuple[str, str]) -> tuple[list[Any], list[Any], list[Any]]:
    """(prompt, [chosen reply], [rejected reply]) of two whole conversations that differ only in their last message."""
    for key, value in zip(keys, (chosen, rejected)):
        if not isinstance(value, list) or len(value) < 2:
            raise DataError(
                f"{where}: {key!r} must be a conversation (prompt messages, then the reply) when data has no prompt "
                f"column (prompt_key: null), got {value!r:.200}"
            )
    if chosen[:-1] != rejected[:-1]:
        raise DataError(
            f"{where}: {keys[0]!r} and {keys[1]!r} must share every message but their last (the prompt); "
            "they differ earlier"
        )
    return chosen[:-1], chosen[-1:], rejected[-1:]


def preference_corpus(pairs: list[PreferencePair]) -> list[str]:
    """Every prompt message and response, for training a tiny model's tokenizer."""
    return [text for pair in pairs for text in [*(m["content"] for m in pair.prompt), pair.chosen, pair.rejected]]


# -------------------------------------------------------------------------------------- generated


def arithmetic_preferences(
    count: int, *, seed: int, num_terms: int = 2, max_value: int = 99, operation: str = "max", split: str = "train"
) -> list[PreferencePair]:
    """`count` seeded pairs of `split` ("train" or "validation"): the prompt "Compute max(37, 48)."
    prefers the right answer "48" to the smallest term "37" (operation "max"); "Compute 37+48."
    prefers "85" to a sum off by 1 to 10 (operation "sum"). The splits never share an expression
    (`split_of`); expressions without a distinct wrong answer (max(5, 5)) are drawn again."""
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    rng = random.Random(f"preferences:{split}:{seed}")
    pairs = []
    for index in range(count):
        while True:  # draw until the expression belongs to this split and has a wrong answer
            expression, value = arithmetic_problem(rng, num_terms=num_terms, max_value=max_value, operation=operation)
            if operation == "max":
                wrong = min(int(term) for term in re.findall(r"\d+", expression))
            else:
                wrong = value + rng.choice([-1, 1]) * rng.randint(1, 10)
            if split_of(expression) == split and wrong != value:
                break
        pairs.append(
            PreferencePair(
                prompt=[{"role": "user", "content": f"Compute {expression}."}],
                chosen=str(value),
                rejected=str(wrong),
                origin=f"arithmetic_preferences:{split}:{seed}:{index}",
            )
        )
    return pairs


# ---------------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class TokenizedPair:
    origin: str
    chosen: TokenizedConversation  # prompt + chosen response; loss_mask 1 on the response's scored tokens
    rejected: TokenizedConversation  # prompt + rejected response, the same way


@dataclass(frozen=True)
class TokenizedPairs:
    pairs: list[TokenizedPair]
    dropped: list[str]  # origins of the pairs with a sequence longer than max_tokens, in order


def _tokenized_response(
    tokenizer: PreTrainedTokenizerBase, pair: PreferencePair, response: str, *, end_of_turn_id: int
) -> TokenizedConversation:
    messages = [*pair.prompt, {"role": "assistant", "content": response}]
    token_ids, spans = supervised_spans(tokenizer, messages, end_of_turn_id=end_of_turn_id, origin=pair.origin)
    start, stop = spans[-1]  # the response's turn; earlier assistant turns are the prompt's
    return TokenizedConversation(origin=pair.origin, token_ids=token_ids, loss_mask=[0] * start + [1] * (stop - start) + [0] * (len(token_ids) - stop))


def tokenize_preferences(
    pairs: list[PreferencePair], tokenizer: PreTrainedTokenizerBase, *, max_tokens: int, end_of_turn_id: int
) -> TokenizedPairs:
    """Each pair's two sequences (prompt + response) with the response's scored tokens masked in;
    a pair with a sequence longer than `max_tokens` is dropped (counted, never truncated).

    Raises:
        DataError: a template the response cannot be located in (chat.py `supervised_spans`), or
            every pair is too long.
    """
    tokenized, dropped = [], []
    for pair in pairs:
        chosen = _tokenized_response(tokenizer, pair, pair.chosen, end_of_turn_id=end_of_turn_id)
        rejected = _tokenized_response(tokenizer, pair, pair.rejected, end_of_turn_id=end_of_turn_id)
        if max(len(chosen.token_ids), len(rejected.token_ids)) > max_tokens:
            dropped.append(pair.origin)
            continue
        tokenized.append(TokenizedPair(origin=pair.origin, chosen=chosen, rejected=rejected))
    if pairs and not tokenized:
        raise DataError(
            f"all {len(pairs)} preference pairs are longer than policy.max_total_sequence_length = {max_tokens} "
            f"tokens (first: {dropped[0]}); raise it"
        )
    return TokenizedPairs(pairs=tokenized, dropped=dropped)


def load_preference_source(
    source: PreferenceSource | ArithmeticPreferenceSource, *, split: str, bad_rows: BadRows | None = None
) -> list[PreferencePair]:
    """The pairs of one recipe source; `split` ("train"/"validation") picks the generated source's
    split, `bad_rows` decides what a malformed file row does (None: raise)."""
    if isinstance(source, ArithmeticPreferenceSource):
        return arithmetic_preferences(
            source.size, seed=source.seed, num_terms=source.num_terms, max_value=source.max_value, operation=source.operation, split=split
        )
    return load_preferences(
        source.path,
        prompt_key=source.prompt_key,
        chosen_key=source.chosen_key,
        rejected_key=source.rejected_key,
        split=source.split,
        limit=source.limit,
        bad_rows=bad_rows,
    )
