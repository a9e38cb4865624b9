"""How the README's result tables write a number and an interval (shared by the ``*_table`` scripts).

A rate or difference is written with three decimals and no leading zero (``.725``, ``-.076``), a
sign when asked (``+.049``), ``-`` where there is no number; a tidy table row with an interval as
``value [low, high]``.
"""

from __future__ import annotations

import math

import pandas as pd


def number(x: float | None, sign: bool = False, digits: int = 3) -> str:
    """``x`` with ``digits`` decimals and no leading zero; ``-`` for None or NaN."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    text = f"{abs(x):.{digits}f}".lstrip("0") or "0"
    return ("-" if x < 0 and float(text) != 0 else "+" if sign else "") + text


def cell(rows: pd.DataFrame, quantity: str, sign: bool = False) -> str:
    """The first row of ``rows`` whose ``quantity`` matches, as ``value [low, high]`` (value alone
    where ``low`` is NaN); ``-`` when there is none."""
    hit = rows[rows["quantity"] == quantity]
    if hit.empty:
        return "-"
    r = hit.iloc[0]
    if math.isnan(r["low"]):
        return number(r["value"], sign)
    return f"{number(r['value'], sign)} [{number(r['low'], sign)}, {number(r['high'], sign)}]"
