"""flash-attn's ``flash_attn.layers`` modules on ring-attn (``flash_attn.layers.rotary`` ->
``ring_attn.layers.rotary``): switching is an import change."""
