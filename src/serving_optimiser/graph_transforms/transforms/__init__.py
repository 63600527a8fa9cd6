"""One module per transform family; each registers its transforms with ``@register``.

The registry imports every module in this package, so adding a module is all it takes.
"""
