"""Import a numbered stage (`1_data.py`, `2_tokenizer.py`, ...) as a module.

Stage files start with a digit, so `import 1_data` is not valid Python; later
stages load earlier ones with `load_stage("1_data")` and reuse their functions
instead of copying them.
"""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_stage(name: str):
    """Return the module for `ROOT/<name>.py`, importing it once per process."""
    module_name = "stage_" + name
    if module_name in sys.modules:
        return sys.modules[module_name]
    path = ROOT / f"{name}.py"
    if not path.exists():
        raise FileNotFoundError(f"stage file {path} not found")
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module
