"""Label configs the tests send: one builder of the multi-label image config.

With ``smart=True`` it is the README's recommended config (its "Recommended label config" section) for
the given labels. Deliberately odd configs (the ones the backend must refuse or that bind
several pairs) stay written out in the tests that need them.
"""

from __future__ import annotations

SMART_TOOLS = ('  <KeyPoint name="point" toName="image" smart="true" smartOnly="true"/>\n'
               '  <Rectangle name="box" toName="image" smart="true" smartOnly="true"/>\n')
REASONS = ('  <TextArea name="semlabel_reasons" toName="image" editable="false" rows="4"\n'
           '            placeholder="semlabel: scores and likely-missing labels"/>\n')


def multilabel_config(labels, *, reasons: bool = True, multiple: bool = True, smart: bool = False,
                      aliases: dict[str, str] | None = None, extra: str = "") -> str:
    """``<Choices name="labels">`` over ``<Image name="image" value="$image">``, one
    ``<Choice>`` per label (``aliases``: label → its ``alias``), one per line.

    ``reasons``: the read-only ``semlabel_reasons`` text area; ``multiple``:
    ``choice="multiple"`` (else a single-choice ``<Choices>``); ``smart``: the smart KeyPoint
    and Rectangle ("point at what is missing"); ``extra``: more XML before ``</View>``."""
    aliases = aliases or {}
    choices = "".join(
        f'    <Choice value="{n}"' + (f' alias="{aliases[n]}"' if n in aliases else "") + "/>\n" for n in labels
    )
    kind = ' choice="multiple"' if multiple else ""
    return ('<View>\n  <Image name="image" value="$image"/>\n'
            + (SMART_TOOLS if smart else "")
            + f'  <Choices name="labels" toName="image"{kind} showInline="true">\n{choices}  </Choices>\n'
            + (REASONS if reasons else "")
            + extra + "</View>")
