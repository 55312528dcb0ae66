"""Chat data for supervised fine-tuning: conversations read from files, directories or the hub,
tokenized with the chat template so that exactly the assistant turns are supervised.

A chat source's row holds a list of {role, content} messages (roles system, user, assistant). It
becomes a `Sample` whose `metadata["messages"]` is that list (the format `type: file` already
uses for chat prompts); `prompt` and `ground_truth` are the last user and assistant messages, for
display only. A malformed row goes to the source's `BadRows` with its file and 0-based row.

Masking. An assistant message supervises the tokens its turn adds to the rendered conversation:
everything after the generation prompt (the role header the model is given at inference) up to
and including the turn's end-of-turn token, where generation stops. A separator the template
writes after that token (Gemma's newline) is never generated, so it is not supervised. The spans
come from rendering the conversation prefix by prefix:

    before  = template(messages[:k], add_generation_prompt=True)   # ...<|turn>model\\n
    through = template(messages[: k + 1])                          # ...<|turn>model\\n85<turn|>\\n

Both must be token prefixes of the whole conversation's rendering. A template that rewrites
earlier turns (one that drops past assistant turns' reasoning, say) is not prefix-stable: the
conversation is refused with an error naming it, never supervised at the wrong tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from posttrain.data.datasets import HUB_ID
from posttrain.data.sources import BadRows, DataError, column_value, convert_rows, first_rows, read_data_file
from posttrain.data.types import Sample

CHAT_ROLES = ("system", "user", "assistant")
DEFAULT_SPLIT = "train"  # what a directory or hub id is read as when the source names no split

# --------------------------------------------------------------------------------------- loading


def load_chat(
    path: str,
    *,
    messages_key: str = "messages",
    split: str | None = None,
    limit: int | None = None,
    bad_rows: BadRows | None = None,
) -> list[Sample]:
    """The conversations at `path`: a local .jsonl/.json/.parquet file (rows named "file row N"),
    or a local directory of such files or a hub id, read with `datasets.load_dataset(path,
    split=split or "train")` (rows named "path:split row N").

    Raises:
        DataError: nothing at `path`, no `messages_key` column, a malformed row (unless
            `bad_rows` skips it), or no rows.
    """
    dataset, source, origin = read_rows(path, split=split, what="chat data")
    columns = list(dataset.column_names)
    if messages_key not in columns and messages_key.split(".", 1)[0] not in columns:
        raise DataError(f"{source}: no messages column {messages_key!r}; columns present: {columns}")

    def convert(index: int, row: dict[str, Any]) -> Sample:
        where = f"{source} row {index}"
        messages = conversation_messages(column_value(row, messages_key, where=where), where=where, key=messages_key)
        return conversation_sample(messages, origin=f"{origin}:{index}")

    return convert_rows(first_rows(dataset, limit), convert, bad_rows or BadRows(), source=source)


def read_rows(path: str, *, split: str | None, what: str) -> tuple[Any, str, str]:
    """(dataset, source, origin prefix) of a local .jsonl/.json/.parquet file ("file", "name.jsonl"),
    or of a local directory or hub id read with `datasets.load_dataset(path, split=split or
    "train")` (both "path:split"). `what` names the data in errors ("chat data").

    Raises:
        DataError: nothing at `path`, a split given for a file, a split that does not load or is empty.
    """
    location = Path(path).expanduser()
    if location.is_file():
        if split is not None:
            raise DataError(f"{path}: a file has no splits, so split {split!r} does not apply; unset it")
        return read_data_file(location), str(location), location.name
    split = split or DEFAULT_SPLIT
    if not location.is_dir() and not HUB_ID.match(path):
        raise DataError(
            f"{what} {path!r} is neither a local file or directory (looked for {location.resolve()}) nor a hub id "
            "of the form owner/name"
        )
    import datasets  # deferred: importing datasets takes about a second

    try:
        dataset = datasets.load_dataset(str(location) if location.is_dir() else path, split=split)
    except Exception as error:
        raise DataError(f"{what} {path!r}: datasets could not load split {split!r}: {error}") from error
    if len(dataset) == 0:
        raise DataError(f"{what} {path!r} split {split!r} has no rows")
    return dataset, f"{path}:{split}", f"{path}:{split}"


def conversation_messages(value: Any, *, where: str, key: str) -> list[dict[str, str]]:
    """A row's messages as plain {role, content} dicts, checked: roles system/user/assistant,
    string contents, non-empty assistant replies, a first message that is not the assistant's
    (there would be nothing to answer) and at least one user and one assistant message.

    Keys other than role and content are refused unless null (Arrow fills a key that only some
    rows have with null): a tool call dropped silently would train on a different conversation.
    """
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: {key!r} must be a non-empty list of {{role, content}} messages, got {value!r:.200}")
    messages = []
    for number, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or "content" not in message:
            raise DataError(f"{where}: {key!r} message {number} must be a {{role, content}} dict, got {message!r:.200}")
        extra = sorted(name for name, v in message.items() if name not in ("role", "content") and v is not None)
        if extra:
            raise DataError(f"{where}: {key!r} message {number} has keys {extra} besides role and content; not supported")
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise DataError(f"{where}: {key!r} message {number} has role {role!r}; expected one of {list(CHAT_ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {key!r} message {number} content must be a string, got {content!r:.200}")
        if role == "assistant" and not content.strip():
            raise DataError(f"{where}: {key!r} message {number} is an empty assistant reply")
        messages.append({"role": role, "content": content})
    roles = [m["role"] for m in messages]
    if roles[0] == "assistant":
        raise DataError(f"{where}: {key!r} starts with an assistant message, which answers nothing (roles: {roles})")
    if "user" not in roles or "assistant" not in roles:
        raise DataError(f"{where}: {key!r} needs a user and an assistant message (roles: {roles})")
    return messages


def conversation_sample(messages: list[dict[str, str]], *, origin: str) -> Sample:
    """A checked conversation as a `Sample`: the last user message and the last reply, for display."""
    last = {m["role"]: m["content"] for m in messages}  # each role's last message
    return Sample(prompt=last["user"], ground_truth=last["assistant"], metadata={"messages": messages}, origin=origin)


def chat_corpus(samples: list[Sample]) -> list[str]:
    """Every message's text, for training a tiny model's tokenizer on the conversations."""
    return [message["content"] for sample in samples for message in sample.metadata["messages"]]


# ---------------------------------------------------------------------------------- tokenization


@dataclass(frozen=True)
class TokenizedConversation:
    origin: str
    token_ids: list[int]  # the whole conversation, chat-templated
    loss_mask: list[int]  # 1 on the supervised tokens (assistant turns up to their end-of-turn token)


@dataclass(frozen=True)
class TokenizedConversations:
    conversations: list[TokenizedConversation]
    dropped: list[str]  # origins of the conversations longer than max_tokens, in order


def chat_token_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool) -> list[int]:
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True)
    return list(rendered["input_ids"])


def _rendered(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, add_generation_prompt: bool, origin: str
) -> list[int]:
    """`chat_token_ids`, with a template that raises (e.g. on roles that do not alternate) reported as this conversation's problem."""
    try:
        return chat_token_ids(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # noqa: BLE001 (jinja raises anything; the row is what the user can fix)
        raise DataError(f"{origin}: the chat template failed on this conversation: {error}") from error


def supervised_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]], *, end_of_turn_id: int, origin: str
) -> tuple[list[int], list[tuple[int, int]]]:
    """The conversation's token ids and, per assistant message, the [start, stop) range of its
    supervised tokens (see the module docstring).

    Raises:
        DataError: naming `origin`: the template fails on the conversation, is not prefix-stable,
            or closes an assistant turn without `end_of_turn_id`.
    """
    full = _rendered(tokenizer, messages, add_generation_prompt=False, origin=origin)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _rendered(tokenizer, messages[:k], add_generation_prompt=True, origin=origin)
        through = _rendered(tokenizer, messages[: k + 1], add_generation_prompt=False, origin=origin)
        for name, prefix in (("with the generation prompt", before), ("through it", through)):
            if full[: len(prefix)] != prefix:
                raise DataError(
                    f"{origin}: the chat template is not prefix-stable: the conversation up to assistant message {k} "
                    f"({name}) does not render as a prefix of the whole conversation, so the tokens of that reply "
                    "cannot be located (does the template rewrite earlier turns?)"
                )
        turn = through[len(before) :]
        if end_of_turn_id not in turn:
            raise DataError(
                f"{origin}: assistant message {k} renders without the end-of-turn token {end_of_turn_id} "
                f"({tokenizer.convert_ids_to_tokens(end_of_turn_id)!r}), which ends a reply at inference"
            )
        last_end = len(turn) - 1 - turn[::-1].index(end_of_turn_id)  # the template's closing marker
        spans.append((len(before), len(before) + last_end + 1))
    return full, spans


def tokenize_conversations(
    samples: list[Sample], tokenizer: PreTrainedTokenizerBase, *, max_tokens: int, end_of_turn_id: int
) -> TokenizedConversations:
    """Each sample's conversation as token ids and its loss mask; a conversation longer than
    `max_tokens` is dropped (counted, never truncated).

    Raises:
        DataError: a conversation the template cannot be located in (see `supervised_spans`), or
            every conversation is too long.
    """
    conversations, dropped = [], []
    for sample in samples:
        token_ids, spans = supervised_spans(
            tokenizer, sample.metadata["messages"], end_of_turn_id=end_of_turn_id, origin=sample.origin
        )
        if len(token_ids) > max_tokens:
            dropped.append(sample.origin)
            continue
        loss_mask = [0] * len(token_ids)
        for start, stop in spans:
            loss_mask[start:stop] = [1] * (stop - start)
        conversations.append(TokenizedConversation(origin=sample.origin, token_ids=token_ids, loss_mask=loss_mask))
    if samples and not conversations:
        raise DataError(
            f"all {len(samples)} conversations are longer than policy.max_total_sequence_length = {max_tokens} "
            f"tokens (first: {dropped[0]}); raise it"
        )
    return TokenizedConversations(conversations=conversations, dropped=dropped)
