"""Config files of the experiment scripts: each ``get_config()`` returns the library's own
config dataclasses, with the exact run command in its docstring."""
