"""The integrations stay optional: ``import gdw`` (and ``gdw.integrations``)
imports none of transformers, lightning, accelerate or tensorboard."""

import subprocess
import sys


def test_import_gdw_imports_no_extra():
    code = ("import sys, gdw, gdw.integrations, gdw.inputs\n"
            "extra = [m for m in ('transformers', 'lightning', 'accelerate', 'tensorboard', "
            "'torch.utils.tensorboard') if m in sys.modules]\n"
            "assert not extra, extra\n")
    subprocess.run([sys.executable, "-c", code], check=True)
