"""Which model names this server answers to: the served model's name and its aliases.

OpenAI clients must name a model; this server serves one. A request may name it by its served name
(``TEXTGEN_MODEL_NAME``, else the model folder's or the bundled model's name), by an alias
(``TEXTGEN_MODEL_ALIASES``, and the stem of the GGUF file the weights came from), or leave ``model`` out.
Any other name is OpenAI's 404 ``model_not_found`` (param ``model``), so a client that meant another
model learns it at once instead of getting this one's output.

Responses report the served name, never the alias asked for: OpenAI's own server answers with the
resolved model (``gpt-4o`` comes back as ``gpt-4o-2024-08-06``), and a client comparing names sees the
model that actually ran.

Used by the ``/v1`` routes (``textgen.api.openai``; ``state.models`` is built in the lifespan) and by the
Batch API's line executor (``textgen.services.batch_lines``): ``served_models(...).resolve(body.model)``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from textgen.config import Settings
from textgen.errors import ModelNotFoundError
from textgen.loader import LoadedModel

# How much of an unknown name the error message repeats (the name is the client's input).
_ECHO_CHARS = 100


@dataclass(frozen=True)
class ServedModels:
    """The served model's name and its aliases, in the order ``GET /v1/models`` lists them."""

    name: str
    aliases: tuple[str, ...] = ()
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def ids(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)

    def resolve(self, requested: str | None) -> str:
        """The served name for a request's ``model`` (None: the served model); 404 for any other name."""
        if requested is None or requested in self.ids:
            return self.name
        raise ModelNotFoundError(self.not_found_message(requested))

    def not_found_message(self, requested: str) -> str:
        shown = requested if len(requested) <= _ECHO_CHARS else requested[:_ECHO_CHARS] + "..."
        aliases = f" (aliases: {', '.join(repr(a) for a in self.aliases)})" if self.aliases else ""
        return (
            f"The model {shown!r} does not exist on this server. It serves {self.name!r}{aliases}: name one of "
            "those in 'model', or leave 'model' out (GET /v1/models lists them)."
        )


def served_models(settings: Settings, model: LoadedModel, created: int | None = None) -> ServedModels:
    """The served name (the loaded model's) and its aliases: TEXTGEN_MODEL_ALIASES, then the GGUF file's
    stem when the weights came from one; duplicates and the served name itself dropped."""
    candidates = list(settings.model_aliases)
    if model.source_file is not None:
        candidates.append(model.source_file.stem)
    aliases = tuple(dict.fromkeys(alias for alias in candidates if alias and alias != model.name))
    if created is None:
        return ServedModels(model.name, aliases)
    return ServedModels(model.name, aliases, created)
