"""Lumina-mGPT JSON: ``conversations`` with ``<|image|>`` markers and an ``image`` list.

Follows Lumina-mGPT's item processor token for token: text next to a marker is kept verbatim (its
newlines and spaces are tokens), images may sit in assistant turns (they are then learned in full), and
with no marker at all every image goes to the start of the first user turn as ``"<|image|> "`` (so the
text starts with a space token); otherwise the marker count must equal ``len(image)``.
"""

from __future__ import annotations

from chameleon_ft.data.conversation import MarkerRules
from chameleon_ft.data.formats import register_format
from chameleon_ft.data.formats.llava import ConversationFormat


@register_format
class LuminaFormat(ConversationFormat):
    name = "lumina"
    description = "Lumina-mGPT JSON: <|image|> markers, an image list, images allowed in assistant turns"
    rules = MarkerRules("<|image|>", unmarked="all", verbatim=True, implicit_separator=" ")
