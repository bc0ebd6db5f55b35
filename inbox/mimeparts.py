"""The MIME body tree of a built message (RFC 2045, 2046, 2387): text parts in the lightest
transfer encoding that fits, alternative/related/mixed containers, attachment and inline parts.
Does no I/O; `inbox.message.build_mime` adds the top-level header fields.
"""

from __future__ import annotations

import email.policy
import re
from email.message import MIMEPart
from typing import TYPE_CHECKING

from inbox.addresses import CONTROLS
from inbox.headers import FOLD_AT

if TYPE_CHECKING:
    from inbox.message import Attachment, ValidatedMessage

_TOKEN = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 2045 §5.1 token
PARAM = re.compile(rf"({_TOKEN})=({_TOKEN}|\"[^\"\\]*\")")  # a Content-Type parameter


def transfer_encoding(text: str) -> str:
    """The lightest Content-Transfer-Encoding that carries `text` (also used by
    `inbox.mimefast`, so both builders choose alike)."""
    lines = re.split(r"\r\n|\r|\n", text)
    clean = text.isascii() and not CONTROLS.search(text.replace("\r", "").replace("\n", ""))
    if clean and max(map(len, lines)) <= FOLD_AT:
        return "7bit"  # RFC 2045 §2.7: short lines, no NUL, CR or LF except as CRLF
    if (len(text.encode("utf-8", "surrogatepass")) - len(text)) * 10 > len(text):
        # Mostly non-ASCII (counted in extra UTF-8 bytes, a C-speed proxy for characters).
        return "base64"
    return "quoted-printable"  # RFC 2045 §6.7: keeps every line under 76 characters


def _text_part(text: str, subtype: str, policy: email.policy.Policy) -> MIMEPart:
    part = MIMEPart(policy=policy)
    part.set_content(text, subtype=subtype, charset="utf-8", cte=transfer_encoding(text))
    return part


def _multipart(subtype: str, parts: list[MIMEPart], policy: email.policy.Policy) -> MIMEPart:
    container = MIMEPart(policy=policy)
    container["Content-Type"] = f"multipart/{subtype}"
    if subtype == "related":  # RFC 2387 §3.1: type= names the root part's type
        container.set_param("type", parts[0].get_content_type())
    for part in parts:
        container.attach(part)
    return container


def _attachment_part(att: Attachment, inline: bool, policy: email.policy.Policy) -> MIMEPart:
    assert att.content_type is not None
    main_sub, _, params = att.content_type.partition(";")
    maintype, subtype = main_sub.split("/")
    part = MIMEPart(policy=policy)
    part.set_content(att.content, maintype=maintype, subtype=subtype,
                     disposition="inline" if inline else "attachment", filename=att.filename,
                     cid=f"<{att.content_id}>" if att.content_id else None,
                     params={k: v.strip('"') for k, v in PARAM.findall(params)} or None)
    return part


def mime_body(v: ValidatedMessage, policy: email.policy.Policy) -> MIMEPart:
    """The body: text | html | alternative(text, html); html -> related(html, inline...);
    mixed outside."""
    html = _text_part(v.html_body, "html", policy) if v.html_body else None
    inline = [a for a in v.attachments if a.content_id] if html is not None else []
    if html is not None and inline:
        html = _multipart("related", [html, *(_attachment_part(a, True, policy)
                                              for a in inline)], policy)
    text = _text_part(v.text_body, "plain", policy) if v.text_body else None
    body = _multipart("alternative", [text, html], policy) if text and html else text or html
    attached = [a for a in v.attachments if not (html is not None and a.content_id)]
    if not attached:
        assert body is not None
        return body
    return _multipart("mixed", ([body] if body else []) + [
        _attachment_part(a, False, policy) for a in attached], policy)
