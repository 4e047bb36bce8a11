"""Built-in quantize methods, registered through the ``modelpress`` entry-point group like any plugin."""

from __future__ import annotations

from modelpress.hookspecs import hookimpl
from modelpress.methods import Method
from modelpress.plugins.quantize.static import Int8StaticOptions, int8_static


@hookimpl
def modelpress_register_methods(register):  # type: ignore[no-untyped-def]
    register(Method(
        name="int8-static", kind="quantize", apply=int8_static, options=Int8StaticOptions, mutates=False,
        summary="QDQ INT8 with calibration; sensitive nodes stay float to keep the accuracy target",
    ))
