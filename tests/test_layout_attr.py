"""`#emb.layout<NAME>` (LayoutAttr): the one attribute every op and type that names a
serving layout carries. Its names are the registry's (`catalog.LAYOUTS`) at the
time of the check, so a layout registered later is accepted everywhere, and an
unknown one is a located error wherever it is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from xdsl.parser import Parser
from xdsl.utils.exceptions import ParseError, VerifyException

from ekko.compiler.registry import make_context
from ekko.compiler.tools.ekko_opt import main as ekko_opt
from ekko.dialects import catalog, emb, kern, sync
from ekko.dialects.common import LayoutAttr

KNOWN = ", ".join(catalog.LAYOUTS)
# a codec of an existing kind with other parameters: no built-in layout is this
U8HALF = catalog.Layout("u8half", catalog.RowAffine(8, "f16", inverse=False))


def module_text(layout: str) -> str:
    """`layout` in each place the IR names one: a table type and its declaration's
    serving copy, a packet type, sync.packet and the kern ops' settings.
    Rows of dim 4; a byte layout's rows are `width` bytes."""
    width = catalog.LAYOUTS[layout].width(4) if layout in catalog.LAYOUTS else 12
    return f"""
emb.table @t : !emb.table<10x4xf32> {{serving = #emb.layout<{layout}>}}
func.func @f(%q: !emb.table<10x4x{layout}>, %v: !emb.versions<10>, %ids: tensor<?xi64>, %rows: tensor<?x{width}xi8>, %pv: tensor<?xi64>) -> !sync.packet<4x{layout}, i64> {{
  %p = sync.packet %ids, %rows, %pv {{layout = #emb.layout<{layout}>, dim = 4 : i64}} : tensor<?xi64>, tensor<?x{width}xi8>, tensor<?xi64>
  %s = sync.pack %q, %v, %ids : !emb.table<10x4x{layout}>, !emb.versions<10>, tensor<?xi64>
  func.return %s : !sync.packet<4x{layout}, i64>
}}
func.func @k(%t: memref<10x4xf32>, %ids: memref<?xi64>, %g: memref<?x4xf32>, %q: memref<10x{width}xi8>, %out: memref<?x4xf32>, %v: memref<10xi64>, %r: memref<?x{width}xi8>, %pv: memref<?xi64>) {{
  kern.update %t, %ids, %g, %q {{optimizer = "sgd", lr = 1.000000e-01 : f64, serving, serving_layout = #emb.layout<{layout}>}} : memref<10x4xf32>, memref<?xi64>, memref<?x4xf32>, memref<10x{width}xi8>
  kern.bag %q, %ids, %out {{layout = #emb.layout<{layout}>, mode = "none"}} : memref<10x{width}xi8>, memref<?xi64>, memref<?x4xf32>
  kern.pack %q, %v, %ids, %r, %pv {{layout = #emb.layout<{layout}>, dim = 4 : i64}} : memref<10x{width}xi8>, memref<10xi64>, memref<?xi64>, memref<?x{width}xi8>, memref<?xi64>
  func.return
}}
"""


def parse(text: str):
    module = Parser(make_context(), text).parse_module()
    module.verify()
    return module


def test_the_attribute_reads_the_catalog() -> None:
    attr = LayoutAttr("int8")
    assert attr.data == "int8" and attr.entry is catalog.LAYOUTS["int8"]
    assert str(attr) == "#emb.layout<int8>" and attr == LayoutAttr.get("int8")
    table = emb.TableType(10, 4, "int4")
    assert table.layout == LayoutAttr("int4") and table.layout.entry.quantized
    assert str(table) == "!emb.table<10x4xint4>"
    with pytest.raises(VerifyException, match=f"unknown layout 'int2'; expected one of {KNOWN}$"):
        LayoutAttr("int2")


def test_every_place_takes_every_layout_and_prints_it_back() -> None:
    text = module_text("int8")
    module = parse(text)
    again = parse(str(module))
    assert str(again) == str(module)
    layouts = [op.properties.get("layout") or op.properties.get("serving_layout")
               for op in module.walk() if isinstance(op, (kern.UpdateOp, kern.BagOp, kern.PackOp,
                                                          sync.PacketOp))]
    assert layouts == [LayoutAttr("int8")] * 4
    table = next(op for op in module.walk() if isinstance(op, emb.TableOp))
    assert table.serving == LayoutAttr("int8")


def test_a_layout_registered_in_a_scope_is_accepted_everywhere_and_only_there() -> None:
    with catalog.LAYOUTS.scoped(U8HALF):
        text = module_text(U8HALF.name)
        module = parse(text)
        assert LayoutAttr("u8half").entry is U8HALF
        bag = next(op for op in module.walk() if isinstance(op, kern.BagOp))
        assert bag.layout == LayoutAttr("u8half")
        assert bag.table.type.get_shape()[1] == U8HALF.width(4) == 8  # 4 codes, f16 scale and bias
        assert str(parse(str(module))) == str(module)
    assert "u8half" not in catalog.LAYOUTS
    with pytest.raises(VerifyException, match="unknown layout 'u8half'"):
        LayoutAttr("u8half")
    with pytest.raises(ParseError, match="unknown layout 'u8half'"):
        parse(text)


def _first(text: str, needle: str) -> tuple[int, int]:
    """1-based line and column of the first `needle` in `text`."""
    for n, line in enumerate(text.split("\n"), 1):
        if needle in line:
            return n, line.index(needle) + 1
    raise AssertionError(needle)


# each place a layout is written, and the text that puts an unknown one there
PLACES = {
    "emb.table's serving": ("{serving = #emb.layout<int8>}", "{serving = #emb.layout<int2>}"),
    "the table type": ("%q: !emb.table<10x4xint8>", "%q: !emb.table<10x4xint2>"),
    "the packet type": ("-> !sync.packet<4xint8, i64> {", "-> !sync.packet<4xint2, i64> {"),
    "sync.packet": ("{layout = #emb.layout<int8>, dim = 4 : i64} : tensor",
                    "{layout = #emb.layout<int2>, dim = 4 : i64} : tensor"),
    "kern.update": ("serving_layout = #emb.layout<int8>", "serving_layout = #emb.layout<int2>"),
    "kern.bag": ('{layout = #emb.layout<int8>, mode = "none"}',
                 '{layout = #emb.layout<int2>, mode = "none"}'),
    "kern.pack": ("{layout = #emb.layout<int8>, dim = 4 : i64} : memref",
                  "{layout = #emb.layout<int2>, dim = 4 : i64} : memref"),
}


@pytest.mark.parametrize("place", PLACES)
def test_an_unknown_layout_is_a_located_error_in_each_place(place: str, tmp_path: Path,
                                                            capsys) -> None:
    good, bad = PLACES[place]
    text = module_text("int8")
    assert text.count(good) == 1, place
    text = text.replace(good, bad)
    line, col = _first(text, "int2")
    path = tmp_path / "m.mlir"
    path.write_text(text)
    rc = ekko_opt([str(path)])
    out, err = capsys.readouterr()
    assert rc == 1 and not out and "Traceback" not in err
    assert err.startswith(f"{path}:{line}:{col}: error: unknown layout 'int2'; "
                          f"expected one of {KNOWN}\n"), err
