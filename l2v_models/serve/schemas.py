"""Request validation for the server: JSON bodies -> `EmbedRequest`, or `ApiError`.

Validation is written out by hand (no pydantic models) so every message names the field and the
index that is wrong, e.g. ``input[3]: empty string (every input needs at least one character)``
or ``input[1][4]: token id 60000 is outside the vocabulary [0, 49152)``.

Request shapes:
- OpenAI `POST /v1/embeddings`: {input, model, encoding_format, dimensions, user} plus l2v's
  extension fields instruction, prompt_name, normalize, truncate, truncation_direction.
  encoding_format: "float", "base64", "float16", "int8", "uint8", "binary" or "ubinary" (the
  rules are in l2v_models.serve.encoding; int8 and uint8 need "normalize": true).
- text-embeddings-inference `POST /embed`: {inputs, normalize, truncate, truncation_direction,
  prompt_name} plus instruction.
- TEI `POST /similarity`: {inputs: {source_sentence, sentences}, truncate, truncation_direction,
  prompt_name, instruction}.
- TEI `POST /tokenize`: {inputs, add_special_tokens, prompt_name, instruction}; `POST /decode`:
  {ids, skip_special_tokens}.

truncation_direction: "right" (the default: the end of a too-long sequence is cut) or "left"
(its beginning), in any case ("Left" is TEI's spelling).

`input` / `inputs`: a string, a list of strings, a list of token ids (one input) or a list of
lists of token ids. Statuses: 422 for malformed JSON (including JSON nested too deeply and
strings holding a lone UTF-16 surrogate), wrong types, empty inputs and token ids outside the
vocabulary; 413 for more inputs than the server allows; 400 for `dimensions` outside 1 ... the
model's width (Matryoshka truncation: the first `dimensions` features). The OpenAI routes answer
400 where this module says 422 (`ApiError.openai_status`): OpenAI and vLLM answer invalid
requests 400.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

# A JSON escape of a UTF-16 surrogate (\ud800-\udfff): only bodies holding one can decode to a
# string with a lone surrogate, so only those are walked (see _find_lone_surrogate).
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class ApiError(Exception):
    """An error answered to the client: HTTP status, a message, the offending field (or None)
    and, where OpenAI has one, a machine-readable code (e.g. "model_not_found")."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):  # fmt: skip
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def __reduce__(self):  # crosses the pipe from a tokenizer process intact
        return (ApiError, (self.status, self.message, self.param, self.code))

    def openai_status(self) -> int:
        """The status on the OpenAI routes: 400 for an invalid request (what this module calls
        422, text-embeddings-inference's status), so the openai client raises BadRequestError."""
        return 400 if self.status == 422 else self.status

    def openai_body(self) -> dict:
        """OpenAI's error object; "code" is the string code where there is one, else the HTTP
        status (as vLLM answers)."""
        status = self.openai_status()
        kind = {
            400: "invalid_request_error",
            401: "authentication_error",
            404: "invalid_request_error",
            405: "invalid_request_error",
            413: "invalid_request_error",
            429: "rate_limit_error",
            499: "client_closed_request",
            503: "service_unavailable",
        }.get(status, "server_error")
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code if self.code is not None else status,
            }
        }

    def tei_body(self) -> dict:
        """text-embeddings-inference's error object (its status is `status` as is)."""
        tei_type = {413: "Validation", 422: "Validation", 429: "Overloaded", 400: "Validation",
                    404: "Validation", 405: "Validation", 401: "Unauthorized",
                    503: "Unhealthy"}.get(self.status, "Backend")  # fmt: skip
        return {"error": self.message, "error_type": tei_type}


@dataclass
class EmbedRequest:
    """A validated embedding request.

    items: per input either a string (text inputs) or a list of token ids (token inputs;
    `tokens` is True). prompt: the prompt (instruction) for the text inputs, or the server's
    default instruction; prompt_name: one of the model's named prompts (at most one of the two).
    normalize: L2-normalize the rows. truncate: cut inputs the model's rules would cut (else
    413). truncation_direction: "right" or "left" (which end a cut removes). encoding_format:
    one of encoding.FORMATS. model: the name the client asked for (None when not given).
    dimensions: keep the first this many features (Matryoshka; None: all). n_inputs: how many
    inputs the request had (items may be dropped once tokenized).
    """

    items: list
    tokens: bool
    normalize: bool = True
    truncate: bool = True
    truncation_direction: str = "right"
    encoding_format: str = "float"
    model: str | None = None
    prompt: str | None = None
    prompt_name: str | None = None
    dimensions: int | None = None
    extra: dict = field(default_factory=dict)
    n_inputs: int = 0

    def __post_init__(self):
        self.n_inputs = self.n_inputs or len(self.items)

    def __len__(self) -> int:
        return self.n_inputs


def parse_json(body: bytes) -> dict:
    """The request body (UTF-8 JSON) as a JSON object, else ApiError 422 saying what is wrong:
    not UTF-8, malformed or nested too deeply, not an object, or a string (value or field name)
    holding a lone UTF-16 surrogate such as "\\ud800" (JSON's escapes allow one; it is not
    text and no tokenizer takes it), named by its place, e.g. ``input[2]``."""
    if not body:
        raise ApiError(422, "empty request body: send a JSON object", None)
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ApiError(
            422, f"request body is not UTF-8 text (invalid byte at offset {e.start}): send the "
            "JSON as UTF-8", None,
        ) from None  # fmt: skip
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ApiError(
            422, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}", None
        ) from None
    except RecursionError:  # Python's parser recurses once per nesting level
        raise ApiError(
            422, "malformed JSON: nested too deeply (a request body is an object of strings "
            "and lists)", None,
        ) from None  # fmt: skip
    if not isinstance(obj, dict):
        raise ApiError(422, f"the request body must be a JSON object, got {_json_type(obj)}", None)
    if _SURROGATE_ESCAPE.search(text):
        found = _find_lone_surrogate(obj)
        if found is not None:
            where, param, index, char = found
            raise ApiError(
                422, f"{where}: lone UTF-16 surrogate \\u{ord(char):04x} at character {index} "
                "is not valid Unicode text; send well-formed text (a surrogate escape needs its "
                "pair)", param,
            )  # fmt: skip
    return obj


def parse_openai(
    obj: dict,
    *,
    vocab_size: int,
    dimension: int,
    max_inputs: int,
    default_instruction: str | None = None,
    has_tokenizer: bool = True,
) -> EmbedRequest:
    """Validate an OpenAI /v1/embeddings body (see the module docstring). dimension: the
    model's output width (the most `dimensions` may ask for)."""
    from l2v_models.serve.encoding import FORMATS, UNIT_ROW_FORMATS

    _reject_unknown(obj, ("input", "model", "encoding_format", "dimensions", "user",
                          "instruction", "prompt_name", "normalize", "truncate",
                          "truncation_direction"))  # fmt: skip
    if "input" not in obj:
        raise ApiError(422, 'missing field "input" (a string or a list of strings)', "input")
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(422, f'"model" must be a string, got {_json_type(model)}', "model")
    user = obj.get("user")
    if user is not None and not isinstance(user, str):
        raise ApiError(422, f'"user" must be a string, got {_json_type(user)}', "user")
    fmt = obj.get("encoding_format")
    if fmt is None:
        fmt = "float"
    if fmt not in FORMATS:
        raise ApiError(
            422, f'"encoding_format" must be one of {", ".join(FORMATS)}, got {fmt!r:.40}',
            "encoding_format",
        )  # fmt: skip
    dims = obj.get("dimensions")
    if dims is not None:
        if isinstance(dims, bool) or not isinstance(dims, int):
            raise ApiError(
                422, f'"dimensions" must be an integer, got {_json_type(dims)}', "dimensions"
            )
        if not 1 <= dims <= dimension:
            raise ApiError(
                400, f'"dimensions" must lie in 1..{dimension} (this model\'s embeddings have '
                f"{dimension} features), got {dims}", "dimensions",
            )  # fmt: skip
    req = _parse_inputs(
        obj, "input", vocab_size=vocab_size, max_inputs=max_inputs,
        default_instruction=default_instruction, has_tokenizer=has_tokenizer,
    )  # fmt: skip
    if fmt in UNIT_ROW_FORMATS and not req.normalize:
        raise ApiError(
            422, f'"encoding_format": "{fmt}" quantizes unit vectors; it needs "normalize": true',
            "encoding_format",
        )  # fmt: skip
    req.encoding_format = fmt
    req.model = model
    req.dimensions = dims
    return req


def parse_tei(
    obj: dict,
    *,
    vocab_size: int,
    max_inputs: int,
    default_instruction: str | None = None,
    has_tokenizer: bool = True,
) -> EmbedRequest:
    """Validate a text-embeddings-inference /embed body (see the module docstring)."""
    _reject_unknown(obj, ("inputs", "normalize", "truncate", "truncation_direction",
                          "prompt_name", "instruction"))  # fmt: skip
    if "inputs" not in obj:
        raise ApiError(422, 'missing field "inputs" (a string or a list of strings)', "inputs")
    return _parse_inputs(
        obj, "inputs", vocab_size=vocab_size, max_inputs=max_inputs,
        default_instruction=default_instruction, has_tokenizer=has_tokenizer,
    )  # fmt: skip


def parse_similarity(
    obj: dict, *, max_inputs: int, default_instruction: str | None = None,
    has_tokenizer: bool = True,
) -> EmbedRequest:  # fmt: skip
    """Validate a TEI /similarity body: {"inputs": {"source_sentence": str, "sentences":
    [str, ...]}, ...}. The request's items are the source sentence, then the sentences."""
    _reject_unknown(obj, ("inputs", "truncate", "truncation_direction", "prompt_name",
                          "instruction"))  # fmt: skip
    inputs = obj.get("inputs")
    if not isinstance(inputs, dict):
        raise ApiError(
            422, '"inputs" must be an object {"source_sentence": "...", "sentences": ["...", '
            f"...]}}, got {_json_type(inputs)}", "inputs",
        )  # fmt: skip
    _reject_unknown(inputs, ("source_sentence", "sentences"))
    source, sentences = inputs.get("source_sentence"), inputs.get("sentences")
    if not isinstance(source, str):
        raise ApiError(422, f'"inputs.source_sentence" must be a string, got '
                       f"{_json_type(source)}", "inputs.source_sentence")  # fmt: skip
    if not isinstance(sentences, list) or not sentences:
        raise ApiError(422, '"inputs.sentences" must be a non-empty list of strings',
                       "inputs.sentences")  # fmt: skip
    if len(sentences) + 1 > max_inputs:
        raise ApiError(
            413, f'"inputs.sentences" has {len(sentences)} sentences but this server takes at '
            f"most {max_inputs - 1} with the source (--max-client-batch-size): split the request",
            "inputs.sentences",
        )  # fmt: skip
    for i, text in enumerate(sentences):
        if not isinstance(text, str):
            raise ApiError(422, f"inputs.sentences[{i}]: expected a string, got "
                           f"{_json_type(text)}", f"inputs.sentences[{i}]")  # fmt: skip
    body = {k: v for k, v in obj.items() if k != "inputs"}
    body["inputs"] = [source, *sentences]
    req = _parse_inputs(body, "inputs", vocab_size=1, max_inputs=max_inputs,
                        default_instruction=default_instruction, has_tokenizer=has_tokenizer)
    if req.tokens:  # only strings reach here; keep the check explicit
        raise ApiError(422, '"inputs" of /similarity are texts', "inputs")
    return req


def parse_tokenize(obj: dict, *, max_inputs: int, default_instruction: str | None = None,
                   has_tokenizer: bool = True) -> tuple[EmbedRequest, bool]:  # fmt: skip
    """Validate a TEI /tokenize body -> (request, add_special_tokens)."""
    _reject_unknown(obj, ("inputs", "add_special_tokens", "prompt_name", "instruction",
                          "truncate", "truncation_direction"))  # fmt: skip
    if "inputs" not in obj:
        raise ApiError(422, 'missing field "inputs" (a string or a list of strings)', "inputs")
    special = _bool_field(obj, "add_special_tokens", True)
    body = {k: v for k, v in obj.items() if k != "add_special_tokens"}
    req = _parse_inputs(body, "inputs", vocab_size=1, max_inputs=max_inputs,
                        default_instruction=default_instruction, has_tokenizer=has_tokenizer)
    if req.tokens:
        raise ApiError(422, '"inputs" of /tokenize are texts (a string or a list of strings)',
                       "inputs")  # fmt: skip
    if not has_tokenizer:
        raise ApiError(422, "this server's model has no tokenizer", "inputs")
    return req, special


def parse_decode(obj: dict, *, vocab_size: int, max_inputs: int) -> tuple[list, bool]:
    """Validate a TEI /decode body -> (lists of token ids, skip_special_tokens)."""
    _reject_unknown(obj, ("ids", "skip_special_tokens"))
    if "ids" not in obj:
        raise ApiError(422, 'missing field "ids" (a list of token ids or of such lists)', "ids")
    skip = _bool_field(obj, "skip_special_tokens", True)
    ids = obj["ids"]
    if not isinstance(ids, list) or not ids:
        raise ApiError(422, f'"ids" must be a non-empty list of token ids, got {_json_type(ids)}',
                       "ids")  # fmt: skip
    if _is_int(ids[0]):
        ids = [ids]
    if len(ids) > max_inputs:
        raise ApiError(413, f'"ids" has {len(ids)} inputs but this server takes at most '
                       f"{max_inputs} per request (--max-client-batch-size)", "ids")  # fmt: skip
    for i, seq in enumerate(ids):
        if not isinstance(seq, list):
            raise ApiError(422, f"ids[{i}]: expected a list of token ids, got {_json_type(seq)}",
                           f"ids[{i}]")  # fmt: skip
        for j, t in enumerate(seq):
            if not _is_int(t) or not 0 <= t < vocab_size:
                raise ApiError(422, f"ids[{i}][{j}]: a token id in [0, {vocab_size}), got "
                               f"{t!r:.40}", f"ids[{i}][{j}]")  # fmt: skip
    return ids, skip


# ------------------------------------------------------------------------------ helpers
def _parse_inputs(
    obj: dict, name: str, *, vocab_size: int, max_inputs: int, default_instruction, has_tokenizer
) -> EmbedRequest:
    normalize = _bool_field(obj, "normalize", True)
    truncate = _bool_field(obj, "truncate", True)
    direction = obj.get("truncation_direction")
    if direction is None:
        direction = "right"
    if not isinstance(direction, str) or direction.lower() not in ("left", "right"):
        raise ApiError(
            422, f'"truncation_direction" must be "right" or "left", got {direction!r:.40}',
            "truncation_direction",
        )  # fmt: skip
    direction = direction.lower()
    instruction = obj.get("instruction")
    if instruction is not None and not isinstance(instruction, str):
        raise ApiError(
            422, f'"instruction" must be a string, got {_json_type(instruction)}', "instruction"
        )
    prompt_name = obj.get("prompt_name")
    if prompt_name is not None and not isinstance(prompt_name, str):
        raise ApiError(
            422, f'"prompt_name" must be a string, got {_json_type(prompt_name)}', "prompt_name"
        )
    if prompt_name is not None and instruction is not None:
        raise ApiError(
            422, 'send "instruction" (a prompt\'s text) or "prompt_name" (one of the model\'s '
            "named prompts), not both", "prompt_name",
        )  # fmt: skip
    value = obj[name]
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise ApiError(
            422, f'"{name}" must be a string, a list of strings or a list of token-id lists, '
            f"got {_json_type(value)}", name,
        )  # fmt: skip
    if not value:
        raise ApiError(422, f'"{name}" is an empty list: send at least one input', name)
    if _is_int(value[0]):
        value = [value]  # one input given as token ids
    if len(value) > max_inputs:
        raise ApiError(
            413, f'"{name}" has {len(value)} inputs but this server takes at most {max_inputs} '
            "per request (--max-client-batch-size): split the request", name,
        )  # fmt: skip
    if isinstance(value[0], str):
        for i, text in enumerate(value):
            if not isinstance(text, str):
                raise ApiError(
                    422, f"{name}[{i}]: expected a string like {name}[0], got {_json_type(text)}",
                    f"{name}[{i}]",
                )  # fmt: skip
            if not text:
                raise ApiError(
                    422, f"{name}[{i}]: empty string (every input needs at least one character)",
                    f"{name}[{i}]",
                )  # fmt: skip
        if not has_tokenizer:
            raise ApiError(
                422, f'this server\'s model has no tokenizer: send "{name}" as token ids', name
            )
        if instruction is None and prompt_name is None:
            instruction = default_instruction
        return EmbedRequest(list(value), tokens=False, normalize=normalize, truncate=truncate,
                            truncation_direction=direction, prompt=instruction,
                            prompt_name=prompt_name)  # fmt: skip
    if instruction or prompt_name is not None:
        field_name = "instruction" if instruction else "prompt_name"
        raise ApiError(
            422, f'"{field_name}" applies to text inputs only; token-id inputs are embedded as '
            "given (put the prompt's tokens in the ids)", field_name,
        )  # fmt: skip
    items = []
    for i, ids in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(ids, list):
            raise ApiError(
                422, f"{where}: expected a list of token ids like {name}[0], got "
                f"{_json_type(ids)}", where,
            )  # fmt: skip
        if not ids:
            raise ApiError(422, f"{where}: empty token-id list", where)
        for j, t in enumerate(ids):
            if not _is_int(t):
                raise ApiError(
                    422, f"{where}[{j}]: token ids must be integers, got {_json_type(t)}",
                    f"{where}[{j}]",
                )  # fmt: skip
            if t < 0 or t >= vocab_size:
                raise ApiError(
                    422, f"{where}[{j}]: token id {t} is outside the vocabulary [0, "
                    f"{vocab_size})", f"{where}[{j}]",
                )  # fmt: skip
        items.append(ids)
    return EmbedRequest(items, tokens=True, normalize=normalize, truncate=truncate,
                        truncation_direction=direction)


def _bool_field(obj: dict, name: str, default: bool) -> bool:
    value = obj.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ApiError(422, f'"{name}" must be true or false, got {_json_type(value)}', name)
    return value


def _reject_unknown(obj: dict, known: tuple[str, ...]) -> None:
    unknown = sorted(k for k in obj if k not in known)
    if unknown:
        raise ApiError(
            422, f"unknown field(s) {', '.join(repr(k) for k in unknown)}; accepted: "
            f"{', '.join(known)}", unknown[0],
        )  # fmt: skip


def _find_lone_surrogate(obj: dict) -> tuple[str, str | None, int, str] | None:
    """(where, param, character index, the surrogate) of the first lone surrogate in a string
    value or field name of the parsed body, else None. `where` is like ``input[2]``,
    ``instruction`` or ``a field name in input[0]``; param is the field (None for a top-level
    field name). Iterative: the body may be nested as deep as json allowed."""
    stack: list[tuple[str, object]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, str):
            bad = _lone_surrogate_at(value)
            if bad is not None:
                return where, where, bad, value[bad]
        elif isinstance(value, dict):
            items = []
            for key, item in value.items():
                bad = _lone_surrogate_at(key)
                if bad is not None:
                    label = f"a field name in {where or 'the request body'}"
                    return label, where or None, bad, key[bad]
                items.append((f"{where}.{key}" if where else key, item))
            stack.extend(reversed(items))  # first field first
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def _lone_surrogate_at(text: str) -> int | None:
    """The index of the first lone surrogate in `text`, else None (json.loads joins a valid
    escape pair into one character, so any surrogate left in a decoded string is lone)."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _json_type(x) -> str:
    if x is None:
        return "null"
    if isinstance(x, bool):
        return "a boolean"
    if isinstance(x, (int, float)):
        return "a number"
    if isinstance(x, str):
        return "a string"
    if isinstance(x, list):
        return "a list"
    if isinstance(x, dict):
        return "an object"
    return type(x).__name__
