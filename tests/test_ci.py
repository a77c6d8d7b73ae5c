""".ci/run fails where a pass would prove nothing: golden fixtures absent, a failed install.

The script runs here against stand-ins: a `python3` first on PATH whose `-m venv` makes a
virtual environment of logging fakes (`pip`, `python`), so nothing is installed.
"""

import os
import subprocess
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN_NAMES = ("var_tiny", "infinity_tiny_d32", "infinity_tiny_d56_patchify", "sparvar_tiny")


def _script(path, body):
  with open(path, "w") as f:
    f.write("#!/usr/bin/env bash\n" + textwrap.dedent(body))
  os.chmod(path, 0o755)


def _fake_python3(bin_dir, log, pip_install_rc):
  """A `python3` whose `-m venv DIR` creates DIR/bin/{activate,pip,python}; every call of
  the fakes is appended to `log`; `pip install -e ...` exits with pip_install_rc."""
  fakes = os.path.join(bin_dir, "venv_bin")
  os.makedirs(fakes)
  _script(os.path.join(fakes, "pip"), f"""\
      echo "pip $*" >> {log}
      [ "$2" = "-e" ] && exit {pip_install_rc}
      exit 0
      """)
  _script(os.path.join(fakes, "python"), f"""\
      echo "python $*" >> {log}
      """)
  _script(os.path.join(bin_dir, "python3"), f"""\
      echo "python3 $*" >> {log}
      [ "$1 $2" = "-m venv" ] || exit 0
      mkdir -p "$3/bin"
      cp {fakes}/pip {fakes}/python "$3/bin/"
      echo "export PATH=\\"$3/bin:\\$PATH\\"" > "$3/bin/activate"
      """)


def _run_ci(tmp_path, golden, pip_install_rc=0):
  log = str(tmp_path / "calls.log")
  open(log, "w").close()
  _fake_python3(str(tmp_path / "fakebin"), log, pip_install_rc)
  env = dict(os.environ, PATH=f"{tmp_path / 'fakebin'}:{os.environ['PATH']}",
             SPARVAR_GOLDEN=str(golden), SPARVAR_CI_VENV=str(tmp_path / "venv"))
  r = subprocess.run(["bash", os.path.join(REPO, ".ci", "run")], env=env, capture_output=True,
                     text=True, timeout=60)
  with open(log) as f:
    return r, f.read()


def _golden(tmp_path, names=GOLDEN_NAMES):
  root = tmp_path / "golden"
  for n in names:
    (root / n).mkdir(parents=True)
  return root


def test_missing_golden_fixtures_fail_before_anything_runs(tmp_path):
  r, calls = _run_ci(tmp_path, _golden(tmp_path, GOLDEN_NAMES[:1]))
  assert r.returncode != 0
  assert "infinity_tiny_d32 infinity_tiny_d56_patchify" in r.stderr
  assert "../shared/golden" in r.stderr and "SPARVAR_GOLDEN" in r.stderr
  assert calls == ""  # no environment made, nothing installed or run


def test_a_failed_install_stops_the_run(tmp_path):
  r, calls = _run_ci(tmp_path, _golden(tmp_path), pip_install_rc=3)
  assert r.returncode == 3, (r.stderr, calls)
  assert "pip install -e .[test]" in calls
  assert "-m sparvar_jax.sample" not in calls and "-m pytest" not in calls


def test_with_everything_in_place_both_commands_run(tmp_path):
  r, calls = _run_ci(tmp_path, _golden(tmp_path))
  assert r.returncode == 0, (r.stderr, calls)
  lines = [l for l in calls.splitlines() if not l.startswith("python3")]
  assert lines[0] == "python -m pip install -q --upgrade pip"
  assert lines[1] == "pip install -e .[test]"
  assert lines[2].startswith("python -m sparvar_jax.sample --out ")
  assert lines[3] == "python -m pytest -q" and len(lines) == 4
