"""Datasets: fetch from S3, parse the five formats, validate every record in one pass, tokenize with label
masks.

Every record becomes either a *conversation* (turns rendered through the tokenizer's chat template, loss on
the turns marked ``train``) or a *plain* sequence of text segments (concatenated, loss on the segments marked
``train``). Labels follow transformers' convention: aligned with ``input_ids``, ``-100`` where no loss is
taken.

Formats (``Auto`` detects by keys, in this order):
    Messages          {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}]}
    PromptCompletion  {"prompt": "...", "completion": "..."}      (strings, or message lists)
    ShareGPT          {"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}
    Alpaca            {"instruction": "...", "input": "...", "output": "..."}
    Text              {"text": "..."}
    Preference        {"prompt": ..., "chosen": ..., "rejected": ...}            (strings, or message lists)
                      {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}

Preference records (method DPO only) become a ``PreferenceRecord``: two records sharing the prompt, the loss
on each side's answer.
"""

from __future__ import annotations

import io
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.contract import TrainerReason
from kubetune_trainer.dpo import PreferenceExample
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.packing import IGNORE_INDEX, Example
from kubetune_trainer.storage import FetchedObject, ObjectInfo, S3Uri, Storage

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
AUTO_ORDER = ("Messages", "PromptCompletion", "ShareGPT", "Alpaca", "Text", "Preference")
MESSAGE_ROLES = frozenset({"system", "user", "assistant", "tool"})
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}
MAX_REPORTED_PROBLEMS = 5

# Used when the tokenizer has no chat template. Each rendered prefix is a string prefix of the next, which is
# what the label masking below relies on.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ message['role'] + ':\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant:\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------------------------------
# Records
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    train: bool  # loss on this turn under trainOn: Completions


@dataclass(frozen=True)
class Record:
    """One parsed example and where it came from (``file:line``)."""

    where: str
    turns: tuple[Turn, ...] = ()  # a conversation, rendered with the chat template
    segments: tuple[tuple[str, bool], ...] = ()  # plain text pieces and whether each is trained on

    @property
    def is_conversation(self) -> bool:
        return bool(self.turns)


class BadRecord(ValueError):
    """A record that cannot be used; the message says which field is wrong and how."""


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair: the same prompt answered the preferred way (``chosen``) and the other way."""

    where: str
    chosen: Record
    rejected: Record


@dataclass
class ParseResult:
    records: list[Record] = field(default_factory=list)
    pairs: list[PreferenceRecord] = field(default_factory=list)  # format Preference: records stays empty
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, what)
    format: str = ""
    detected_at: str = ""


def _field(obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise BadRecord(f"missing key '{key}'")
    return obj[key]


def _require_str(obj: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = _field(obj, key)
    if not isinstance(value, str):
        raise BadRecord(f"'{key}' must be a string, got {_type_name(value)}")
    if not allow_empty and not value.strip():
        raise BadRecord(f"'{key}' is empty")
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _messages(
    obj: dict[str, Any],
    key: str,
    role_key: str,
    content_key: str,
    roles: dict[str, str] | frozenset[str],
    column_map: dict[str, str],
) -> list[tuple[str, str]]:
    """The (role, content) pairs of the message list at ``obj[key]``, roles mapped through ``roles``."""
    raw = _field(obj, key)
    role_key = column_map.get(role_key, role_key)
    content_key = column_map.get(content_key, content_key)
    if not isinstance(raw, list):
        raise BadRecord(f"'{key}' must be a list of messages, got {_type_name(raw)}")
    if not raw:
        raise BadRecord(f"'{key}' is an empty list")
    turns = []
    for index, message in enumerate(raw):
        if not isinstance(message, dict):
            raise BadRecord(f"{key}[{index}] must be an object, got {_type_name(message)}")
        if role_key not in message:
            raise BadRecord(f"{key}[{index}] has no '{role_key}'")
        role = message[role_key]
        if not isinstance(role, str) or role not in roles:
            allowed = ", ".join(sorted(roles))
            raise BadRecord(f"{key}[{index}] has unknown {role_key} {role!r} (allowed: {allowed})")
        if content_key not in message:
            raise BadRecord(f"{key}[{index}] has no '{content_key}'")
        content = message[content_key]
        if not isinstance(content, str):
            raise BadRecord(f"{key}[{index}].{content_key} must be a string, got {_type_name(content)}")
        mapped = roles[role] if isinstance(roles, dict) else role
        turns.append((mapped, content))
    return turns


def _conversation(pairs: list[tuple[str, str]], trained_from: int = 0) -> tuple[Turn, ...]:
    turns = tuple(
        Turn(role, content, train=role == "assistant" and index >= trained_from)
        for index, (role, content) in enumerate(pairs)
    )
    if not any(turn.train for turn in turns):
        raise BadRecord("no assistant message to learn from")
    return turns


def _parse_messages(obj: dict[str, Any], column_map: dict[str, str]) -> Record:
    pairs = _messages(obj, "messages", "role", "content", MESSAGE_ROLES, column_map)
    return Record("", turns=_conversation(pairs))


def _parse_prompt_completion(obj: dict[str, Any], column_map: dict[str, str]) -> Record:
    prompt, completion = _field(obj, "prompt"), _field(obj, "completion")
    if isinstance(prompt, str) and isinstance(completion, str):
        if not completion.strip():
            raise BadRecord("'completion' is empty")
        return Record("", segments=((prompt, False), (completion, True)))
    if isinstance(prompt, list) and isinstance(completion, list):
        before = _messages(obj, "prompt", "role", "content", MESSAGE_ROLES, column_map)
        after = _messages(obj, "completion", "role", "content", MESSAGE_ROLES, column_map)
        return Record("", turns=_conversation(before + after, trained_from=len(before)))
    raise BadRecord(
        f"'prompt' and 'completion' must both be strings or both be message lists, got "
        f"{_type_name(prompt)} and {_type_name(completion)}"
    )


def _parse_sharegpt(obj: dict[str, Any], column_map: dict[str, str]) -> Record:
    pairs = _messages(obj, "conversations", "from", "value", SHAREGPT_ROLES, column_map)
    return Record("", turns=_conversation(pairs))


def _parse_alpaca(obj: dict[str, Any], column_map: dict[str, str]) -> Record:
    instruction = _require_str(obj, "instruction")
    extra = obj.get("input", "")
    if extra is None:
        extra = ""
    if not isinstance(extra, str):
        raise BadRecord(f"'input' must be a string, got {_type_name(extra)}")
    output = _require_str(obj, "output")
    pairs = []
    system = obj.get("system")
    if isinstance(system, str) and system.strip():
        pairs.append(("system", system))
    pairs.append(("user", f"{instruction}\n\n{extra}" if extra.strip() else instruction))
    pairs.append(("assistant", output))
    return Record("", turns=_conversation(pairs))


def _parse_text(obj: dict[str, Any], column_map: dict[str, str]) -> Record:
    return Record("", segments=((_require_str(obj, "text"), True),))


def _parse_preference(obj: dict[str, Any], column_map: dict[str, str]) -> PreferenceRecord:
    """{"prompt", "chosen", "rejected"} (strings; or message lists, the prompt either given apart or the
    shared prefix of both chats) or OpenAI's {"input": {"messages"}, "preferred_output",
    "non_preferred_output"}."""
    if "preferred_output" in obj or "non_preferred_output" in obj:
        source = _field(obj, "input")
        if not isinstance(source, dict):
            raise BadRecord(f"'input' must be an object with 'messages', got {_type_name(source)}")
        prompt = _messages(source, "messages", "role", "content", MESSAGE_ROLES, column_map)
        chosen = _messages(obj, "preferred_output", "role", "content", MESSAGE_ROLES, column_map)
        rejected = _messages(obj, "non_preferred_output", "role", "content", MESSAGE_ROLES, column_map)
        return _preference_chats(prompt, chosen, rejected, ("preferred_output", "non_preferred_output"))
    chosen_raw, rejected_raw = _field(obj, "chosen"), _field(obj, "rejected")
    prompt_raw = obj.get("prompt")
    if isinstance(chosen_raw, str) and isinstance(rejected_raw, str):
        if not isinstance(prompt_raw, str):
            raise BadRecord(
                f"'prompt' must be a string when chosen and rejected are, got {_type_name(prompt_raw)}"
            )
        for key, answer in (("chosen", chosen_raw), ("rejected", rejected_raw)):
            if not answer.strip():
                raise BadRecord(f"'{key}' is empty")
        if chosen_raw == rejected_raw:
            raise BadRecord(
                "'chosen' and 'rejected' are identical; a pair must differ to say which is preferred"
            )
        return PreferenceRecord(
            "",
            Record("", segments=((prompt_raw, False), (chosen_raw, True))),
            Record("", segments=((prompt_raw, False), (rejected_raw, True))),
        )
    if not (isinstance(chosen_raw, list) and isinstance(rejected_raw, list)):
        raise BadRecord(
            f"'chosen' and 'rejected' must both be strings or both be message lists, got "
            f"{_type_name(chosen_raw)} and {_type_name(rejected_raw)}"
        )
    chosen = _messages(obj, "chosen", "role", "content", MESSAGE_ROLES, column_map)
    rejected = _messages(obj, "rejected", "role", "content", MESSAGE_ROLES, column_map)
    if prompt_raw is None:  # the prompt is what both chats share
        shared = 0
        while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
            shared += 1
        return _preference_chats(chosen[:shared], chosen[shared:], rejected[shared:], ("chosen", "rejected"))
    if not isinstance(prompt_raw, list):
        raise BadRecord(
            f"'prompt' must be a message list when chosen and rejected are, got {_type_name(prompt_raw)}"
        )
    prompt = _messages(obj, "prompt", "role", "content", MESSAGE_ROLES, column_map)
    answers = []
    for key, chat in (("chosen", chosen), ("rejected", rejected)):
        if chat[: len(prompt)] == prompt:  # the whole chat, the prompt first
            answers.append(chat[len(prompt) :])
        elif chat[0][0] == "assistant":  # the answer alone
            answers.append(chat)
        else:
            raise BadRecord(
                f"'prompt' is not a prefix of '{key}': give '{key}' as the whole chat starting with the "
                "prompt's messages, or as the assistant's answer alone"
            )
    return _preference_chats(prompt, answers[0], answers[1], ("chosen", "rejected"))


def _preference_chats(
    prompt: list[tuple[str, str]],
    chosen: list[tuple[str, str]],
    rejected: list[tuple[str, str]],
    keys: tuple[str, str],
) -> PreferenceRecord:
    for key, answer in zip(keys, (chosen, rejected), strict=True):
        if not answer or not any(role == "assistant" and content.strip() for role, content in answer):
            raise BadRecord(f"'{key}' has no assistant answer after the prompt (an empty side)")
    if chosen == rejected:
        raise BadRecord(
            f"'{keys[0]}' and '{keys[1]}' are identical; a pair must differ to say which is preferred"
        )
    return PreferenceRecord(
        "",
        Record("", turns=_conversation(prompt + chosen, trained_from=len(prompt))),
        Record("", turns=_conversation(prompt + rejected, trained_from=len(prompt))),
    )


PARSERS: dict[str, Callable[[dict[str, Any], dict[str, str]], Record | PreferenceRecord]] = {
    "Messages": _parse_messages,
    "PromptCompletion": _parse_prompt_completion,
    "ShareGPT": _parse_sharegpt,
    "Alpaca": _parse_alpaca,
    "Text": _parse_text,
    "Preference": _parse_preference,
}

# The keys that identify a format when ``format: Auto``.
SIGNATURE_KEYS: dict[str, tuple[str, ...]] = {
    "Messages": ("messages",),
    "PromptCompletion": ("prompt", "completion"),
    "ShareGPT": ("conversations",),
    "Alpaca": ("instruction", "output"),
    "Text": ("text",),
    "Preference": ("chosen", "rejected"),
}
# A format that more than one set of keys identifies.
OTHER_SIGNATURE_KEYS: dict[str, tuple[str, ...]] = {
    "Preference": ("preferred_output", "non_preferred_output"),
}


def detect_format(obj: dict[str, Any]) -> str | None:
    """The first format (in ``AUTO_ORDER``) whose keys the object has, or None."""
    for name in AUTO_ORDER:
        if all(key in obj for key in SIGNATURE_KEYS[name]):
            return name
        if name in OTHER_SIGNATURE_KEYS and all(key in obj for key in OTHER_SIGNATURE_KEYS[name]):
            return name
    return None


def apply_column_map(obj: dict[str, Any], column_map: dict[str, str]) -> dict[str, Any]:
    """Rename the dataset's keys to ours: ``columnMap`` maps our key to the dataset's key."""
    if not column_map:
        return obj
    renamed = dict(obj)
    for ours, theirs in column_map.items():
        if theirs in obj and ours != theirs:
            renamed[ours] = renamed.pop(theirs)
    return renamed


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------


def iter_objects(name: str, data: bytes) -> Iterator[tuple[str, Any]]:
    """(where, decoded JSON value or BadRecord) for each record of a .jsonl, .json or .parquet file."""
    lower = name.lower()
    if lower.endswith(".parquet"):
        yield from _iter_parquet(name, data)
    elif lower.endswith(".json"):
        yield from _iter_json(name, data)
    else:
        yield from _iter_jsonl(name, data)


def _iter_jsonl(name: str, data: bytes) -> Iterator[tuple[str, Any]]:
    for number, raw in enumerate(data.split(b"\n"), start=1):
        where = f"{name}:{number}"
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield where, BadRecord(f"not UTF-8 (byte {err.start})")
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as err:
            yield where, BadRecord(f"invalid JSON ({err.msg} at column {err.colno})")


def _iter_json(name: str, data: bytes) -> Iterator[tuple[str, Any]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        yield f"{name}:1", BadRecord(f"not UTF-8 (byte {err.start})")
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # JSON Lines saved as .json
            yield from _iter_jsonl(name, data)
        else:
            yield f"{name}:{err.lineno}", BadRecord(f"invalid JSON ({err.msg} at column {err.colno})")
        return
    if isinstance(value, dict):
        # One object, or {"data": [...]}-style wrappers with a single list of records.
        lists = [
            v for v in value.values() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
        ]
        value = lists[0] if detect_format(value) is None and len(lists) == 1 else [value]
    if not isinstance(value, list):
        yield f"{name}:1", BadRecord(f"a .json dataset must hold a list of records, got {_type_name(value)}")
        return
    for index, item in enumerate(value):
        yield f"{name}[{index}]", item


def _iter_parquet(name: str, data: bytes) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:  # pyarrow raises several types for a corrupt file
        yield f"{name}", BadRecord(f"not a readable Parquet file ({err})")
        return
    for index, row in enumerate(table.to_pylist(), start=1):
        yield f"{name}:row {index}", row


def parse_records(
    files: Sequence[tuple[str, bytes]], fmt: str = "Auto", column_map: dict[str, str] | None = None
) -> ParseResult:
    """Parse every record of every file; collect all problems rather than stopping at the first."""
    column_map = column_map or {}
    result = ParseResult(format="" if fmt == "Auto" else fmt)
    pending: list[tuple[str, dict[str, Any]]] = []  # objects seen before the format was known
    position: dict[str, int] = {}
    for name, data in files:
        for where, value in iter_objects(name, data):
            position[where] = len(position)
            if isinstance(value, BadRecord):
                result.problems.append((where, str(value)))
                continue
            if not isinstance(value, dict):
                result.problems.append((where, f"a record must be a JSON object, got {_type_name(value)}"))
                continue
            obj = apply_column_map(value, column_map)
            if not result.format:
                detected = detect_format(obj)
                if detected is None:
                    pending.append((where, obj))
                    continue
                result.format, result.detected_at = detected, where
            _parse_one(result, where, obj, column_map)
    for where, obj in pending:
        if result.format:
            _parse_one(result, where, obj, column_map)
        else:
            keys = ", ".join(sorted(obj)) or "none"
            result.problems.append(
                (where, f"keys ({keys}) match no known format; see dataset.format and columnMap")
            )
    result.problems.sort(key=lambda problem: position[problem[0]])
    return result


def _parse_one(result: ParseResult, where: str, obj: dict[str, Any], column_map: dict[str, str]) -> None:
    try:
        record = PARSERS[result.format](obj, column_map)
    except BadRecord as err:
        message = str(err)
        other = detect_format(obj)
        if other and other != result.format:
            origin = f" (detected from {result.detected_at})" if result.detected_at else ""
            message += f"; it looks like {other} but the dataset is {result.format}{origin}"
        result.problems.append((where, message))
        return
    if isinstance(record, PreferenceRecord):
        result.pairs.append(PreferenceRecord(where, record.chosen, record.rejected))
    else:
        result.records.append(Record(where, record.turns, record.segments))


def describe_problems(problems: Sequence[tuple[str, str]], source: str) -> str:
    shown = "; ".join(f"{where}: {what}" for where, what in problems[:MAX_REPORTED_PROBLEMS])
    more = (
        f" (and {len(problems) - MAX_REPORTED_PROBLEMS} more)"
        if len(problems) > MAX_REPORTED_PROBLEMS
        else ""
    )
    return (
        f"{len(problems)} malformed record(s) in {source}: {shown}{more}. Fix or remove these records "
        "(or set dataset.format / columnMap to match them) and resubmit"
    )


# ----------------------------------------------------------------------------------------------------
# Fetching
# ----------------------------------------------------------------------------------------------------


def list_dataset(storage: Storage, uri: str) -> list[ObjectInfo]:
    """The objects a dataset URI names (one object, or every .jsonl/.json/.parquet object under a prefix),
    with their ETags, without reading them."""
    location = S3Uri.parse(uri)
    if location.key and not location.key.endswith("/"):
        found = storage.exists(location, not_found=TrainerReason.DATASET_NOT_FOUND)
        if found is not None:
            if not location.key.lower().endswith(DATA_EXTENSIONS):
                raise TrainerError(
                    TrainerReason.INVALID_DATASET,
                    f"{uri}: unsupported file type; use .jsonl, .json or .parquet",
                )
            return [found]
        location = S3Uri(location.bucket, location.key + "/")
    listed = storage.list(location, not_found=TrainerReason.DATASET_NOT_FOUND)
    usable = [o for o in listed if o.uri.key.lower().endswith(DATA_EXTENSIONS)]
    if not usable:
        seen = f" (found {len(listed)} object(s), none .jsonl/.json/.parquet)" if listed else ""
        raise TrainerError(
            TrainerReason.DATASET_NOT_FOUND,
            f"{uri} names no dataset object{seen}; upload a .jsonl, .json or .parquet file there",
        )
    return usable


def fetch_dataset(storage: Storage, uri: str) -> list[FetchedObject]:
    """The objects a dataset URI names, read (each with the ETag of the bytes read)."""
    return [
        storage.read(o.uri, not_found=TrainerReason.DATASET_NOT_FOUND) for o in list_dataset(storage, uri)
    ]


def display_names(objects: Sequence[FetchedObject], uri: str) -> list[str]:
    """Short names for messages: the key relative to the dataset prefix (the file name for one object)."""
    base = S3Uri.parse(uri).key
    prefix = base if base.endswith("/") else base.rpartition("/")[0] + "/" if "/" in base else ""
    names = []
    for obj in objects:
        key = obj.uri.key
        names.append(key[len(prefix) :] if prefix and key.startswith(prefix) else key.rpartition("/")[2])
    return names


def load_records(
    storage: Storage, uri: str, fmt: str, column_map: dict[str, str] | None
) -> tuple[ParseResult, list[FetchedObject]]:
    """Fetch and parse a dataset; raise InvalidDataset / EmptyDataset before any heavy work."""
    objects = fetch_dataset(storage, uri)
    names = display_names(objects, uri)
    result = parse_records([(n, o.data) for n, o in zip(names, objects, strict=True)], fmt, column_map)
    if result.problems:
        raise TrainerError(TrainerReason.INVALID_DATASET, describe_problems(result.problems, uri))
    if not result.records and not result.pairs:
        raise TrainerError(
            TrainerReason.EMPTY_DATASET, f"{uri} holds no records; upload at least one example"
        )
    return result, objects


# ----------------------------------------------------------------------------------------------------
# Tokenizing
# ----------------------------------------------------------------------------------------------------


@dataclass
class TokenizeStats:
    examples: int = 0
    tokens: int = 0
    label_tokens: int = 0
    truncated: int = 0
    chunked: int = 0  # long Text records cut into windows (dataset.textMode Chunk)
    windows: int = 0  # the examples those records became
    dropped_no_labels: int = 0  # truncation left nothing to learn from

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class Tokenize:
    """Turns records into ``Example``s: chat template for conversations, label masks, truncation."""

    def __init__(self, tokenizer: Any, max_seq_length: int, train_on_all: bool) -> None:
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.train_on_all = train_on_all
        self.template = getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE
        self.eos_id = tokenizer.eos_token_id

    def __call__(self, record: Record) -> Example:
        if record.is_conversation:
            text, spans = self._render(record.turns)
            add_special = False
        else:
            text, spans = _concat(record.segments)
            add_special = True
        encoded = self.tokenizer(
            text,
            add_special_tokens=add_special,
            return_offsets_mapping=True,
            return_special_tokens_mask=True,
        )
        input_ids: list[int] = list(encoded["input_ids"])
        offsets: list[tuple[int, int]] = [tuple(o) for o in encoded["offset_mapping"]]
        special: list[int] = list(encoded.get("special_tokens_mask") or [0] * len(input_ids))
        # A token is trained on when it holds any trained character (a BPE token may start with the space
        # before a completion).
        trained = [
            not (is_special and start == end) and any(start < hi and end > lo for lo, hi in spans)
            for (start, end), is_special in zip(offsets, special, strict=True)
        ]
        if (
            not record.is_conversation
            and self.eos_id is not None
            and (not input_ids or input_ids[-1] != self.eos_id)
        ):
            input_ids.append(self.eos_id)
            trained.append(record.segments[-1][1])
        labels = [
            token if (self.train_on_all or train) else IGNORE_INDEX
            for token, train in zip(input_ids, trained, strict=True)
        ]
        return Example(input_ids=input_ids, labels=labels)

    def _apply_template(self, turns: Sequence[Turn], generation_prompt: bool) -> str:
        rendered = self.tokenizer.apply_chat_template(
            [{"role": t.role, "content": t.content} for t in turns],
            chat_template=self.template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
        return str(rendered)

    def _render(self, turns: Sequence[Turn]) -> tuple[str, list[tuple[int, int]]]:
        """The whole conversation and the character spans of its trained turns (each turn's text as the
        template renders it after the generation prompt, end-of-turn marker included)."""
        full = self._apply_template(turns, generation_prompt=False)
        spans: list[tuple[int, int]] = []
        search_from = 0
        for index, turn in enumerate(turns):
            if not turn.train:
                continue
            before = self._apply_template(turns[:index], generation_prompt=True) if index else ""
            through = self._apply_template(turns[: index + 1], generation_prompt=False)
            if through.startswith(before) and full.startswith(through):
                spans.append((len(before), len(through)))
                search_from = len(through)
            else:
                # A template whose prefixes are not prefixes of the whole (it rewrites earlier turns):
                # fall back to finding the turn's text itself.
                start = full.find(turn.content, search_from)
                if start < 0:
                    raise BadRecord(f"the chat template dropped the text of turn {index}")
                spans.append((start, start + len(turn.content)))
                search_from = start + len(turn.content)
        return full, spans


def _concat(segments: Sequence[tuple[str, bool]]) -> tuple[str, list[tuple[int, int]]]:
    text = ""
    spans = []
    for piece, train in segments:
        if train:
            spans.append((len(text), len(text) + len(piece)))
        text += piece
    return text, spans


def text_windows(length: int, max_seq_length: int) -> list[tuple[int, int]]:
    """[start, end) token ranges that cut a sequence of ``length`` tokens into examples of at most
    ``max_seq_length`` tokens. Consecutive windows share one token: a window's first token is never a
    prediction target (nothing in the window precedes it), so it repeats the previous window's last token
    as context, and every token after the sequence's first is a target in exactly one window."""
    if max_seq_length < 2:
        raise ValueError(f"text_windows: max_seq_length must be >= 2, got {max_seq_length}")
    if length <= max_seq_length:
        return [(0, length)]
    stride = max_seq_length - 1
    windows = []
    start = 0
    while True:
        end = min(start + max_seq_length, length)
        windows.append((start, end))
        if end == length:
            return windows
        start += stride


def tokenize_records(
    records: Sequence[Record], tokenize: Tokenize, source: str, chunk_long: bool = False
) -> tuple[list[Example], TokenizeStats]:
    """Tokenize, fit to ``max_seq_length`` and drop examples left with no label; returns the examples and
    counts for provenance. A longer example is truncated, or with ``chunk_long`` (Text records under
    dataset.textMode Chunk) cut into windows (``text_windows``), each an example of its own, so continued
    pretraining learns from the whole text."""
    examples: list[Example] = []
    stats = TokenizeStats()
    problems: list[tuple[str, str]] = []
    for record in records:
        try:
            example = tokenize(record)
        except BadRecord as err:
            problems.append((record.where, str(err)))
            continue
        except Exception as err:  # a template that raises on this conversation (e.g. role order rules)
            problems.append((record.where, f"the chat template failed: {err}"))
            continue
        pieces = [example]
        if len(example.input_ids) > tokenize.max_seq_length:
            if chunk_long:
                stats.chunked += 1
                spans = text_windows(len(example.input_ids), tokenize.max_seq_length)
                pieces = [Example(example.input_ids[a:b], example.labels[a:b]) for a, b in spans]
                stats.windows += len(pieces)
            else:
                stats.truncated += 1
                cut = tokenize.max_seq_length
                pieces = [Example(example.input_ids[:cut], example.labels[:cut])]
        for piece in pieces:
            # The first token's label is never scored (nothing predicts it).
            if all(label == IGNORE_INDEX for label in piece.labels[1:]):
                stats.dropped_no_labels += 1
                continue
            examples.append(piece)
            stats.examples += 1
            stats.tokens += len(piece.input_ids)
            stats.label_tokens += sum(1 for label in piece.labels[1:] if label != IGNORE_INDEX)
    if problems:
        raise TrainerError(TrainerReason.INVALID_DATASET, describe_problems(problems, source))
    if not examples:
        raise TrainerError(
            TrainerReason.EMPTY_DATASET,
            f"{source}: no example has a token to learn from after truncation to maxSeqLength="
            f"{tokenize.max_seq_length} ({stats.dropped_no_labels} dropped); raise dataset.maxSeqLength or "
            "shorten the prompts",
        )
    return examples, stats


def tokenize_pairs(
    pairs: Sequence[PreferenceRecord], tokenize: Tokenize, source: str
) -> tuple[list[PreferenceExample], TokenizeStats]:
    """Both sides of every pair tokenized as ``tokenize_records`` does one record (``examples`` counts pairs,
    ``tokens`` both sides); a pair either side of which truncation leaves without an answer token is
    dropped."""
    pair_examples: list[PreferenceExample] = []
    stats = TokenizeStats()
    problems: list[tuple[str, str]] = []
    for pair in pairs:
        sides = []
        for record in (pair.chosen, pair.rejected):
            try:
                sides.append(tokenize(record))
            except BadRecord as err:
                problems.append((pair.where, str(err)))
            except Exception as err:  # a template that raises on this conversation
                problems.append((pair.where, f"the chat template failed: {err}"))
        if len(sides) != 2:
            continue
        cut = tokenize.max_seq_length
        if any(len(side.input_ids) > cut for side in sides):
            stats.truncated += 1
            sides = [Example(side.input_ids[:cut], side.labels[:cut]) for side in sides]
        if any(all(label == IGNORE_INDEX for label in side.labels[1:]) for side in sides):
            stats.dropped_no_labels += 1
            continue
        pair_examples.append(PreferenceExample(sides[0], sides[1]))
        stats.examples += 1
        stats.tokens += sum(len(side.input_ids) for side in sides)
        stats.label_tokens += sum(1 for side in sides for label in side.labels[1:] if label != IGNORE_INDEX)
    if problems:
        raise TrainerError(TrainerReason.INVALID_DATASET, describe_problems(problems, source))
    if not pair_examples:
        raise TrainerError(
            TrainerReason.EMPTY_DATASET,
            f"{source}: no preference pair keeps an answer token on both sides after truncation to "
            f"maxSeqLength={tokenize.max_seq_length} ({stats.dropped_no_labels} dropped); raise "
            "dataset.maxSeqLength or shorten the prompts",
        )
    return pair_examples, stats


def split_validation(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, validation) index lists holding out ``fraction`` of ``count`` records."""
    if count < 2:
        raise TrainerError(
            TrainerReason.EMPTY_DATASET,
            f"validationSplit needs at least 2 records, the dataset has {count}",
        )
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = min(count - 1, max(1, round(count * fraction)))
    return sorted(order[held:]), sorted(order[:held])
