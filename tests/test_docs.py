"""Documentation that cannot rot: every ```bash block of README.md and docs/*.md runs, on a tiny world.

How a block is checked depends on the HTML comment right before it:

* no marker: the block **runs**. Bash executes it (``cd``, loops, variables) inside a temporary copy of the
  experiment folders, with ``python`` defined as a shell function that only records ``(cwd, argv)``; the
  recorded commands are then replayed in order, in this process, through each script's own parser and
  ``main`` (``cortex.scripts.run_script``) after the substitutions of ``SUBSTITUTIONS`` below shrink the world.
  All run blocks of one page share one copy, in page order.
* ``<!-- docs-test: fresh (reason) -->``: runs like the above, in a new copy (the block trains its own IEMs).
* ``<!-- docs-test: twice (reason) -->``: runs like the above, then again in the same copy: the block must
  paste cleanly over its own outputs (the README's pipeline over the demo's).
* ``<!-- docs-test: parse-only (reason) -->``: the block cannot run here (real data, taming checkpoints,
  SLURM, several GPUs, ``make demo``). ``bash -n`` checks its syntax; every ``python script.py ...`` must name
  an existing script whose ``get_args_parser()`` accepts the flags; ``sbatch`` templates and ``*.sh`` scripts
  must exist and pass ``bash -n`` (the flags after a template are parsed by the script the template runs);
  ``make`` targets must exist in the Makefile.

On a failure the message names the page and line of the block and shows the block, the command (as written
and as run) and its output.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import subprocess
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

from cortex.scripts import REPO, load_script, run_script

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
EXPERIMENTS = ("VQGAN_explanation", "Dalle_explanation")
SKIP_COPY = {"datasets", "checkpoints", "logs", "results", "scattered_world", "__pycache__"}

# ----------------------------------------------------------------------------- the substitution table
# The only changes made to a documented command before it runs. Keep this table small and explicit.
#   world: generate_dataset.py --source synthetic: its world-size flags are dropped and these appended
#   caps:  flag -> the largest value a run block may use (smaller values are kept)
#   add:   flags appended when a script's command line does not set them
TINY_VQGAN_WORLD = ["--num_classes", "10", "--train_per_class", "2", "--val_per_class", "1", "--test_per_class", "1",
                    "--n_codes", "128", "--n_background", "16", "--n_distractors", "4", "--object_size", "3", "4",
                    "--patch_size", "2"]
TINY_BIAS_WORLD = ["--train_per_class", "6", "--val_per_class", "2", "--test_per_class", "2",
                   "--neutral_images", "12", "--n_codes", "640", "--patch_size", "2"]
SUBSTITUTIONS = {
    ("VQGAN_explanation", "generate_dataset.py"): {"world": TINY_VQGAN_WORLD},
    ("Dalle_explanation", "generate_dataset.py"): {"world": TINY_BIAS_WORLD},
    "train.py": {"caps": {"--epochs": 1, "--width": 16}},
    "train_evaluators.py": {"caps": {"--epochs": 1}, "add": ["--archs", "resnet10"]},
    "TIS_computation.py": {"caps": {"--nsamples": 2, "--ig_steps": 2}, "add": ["--nsamples", "2", "--ig_steps", "2"]},
    "sample_image_level_explanation.py": {"add": ["--num_tokens", "5", "10", "--no_figures"]},
    "sample_concept_level_explanation.py": {"add": ["--no_figures"]},
    "codebook_level_explanation.py": {"caps": {"--steps": 4, "--eval_every": 2}, "add": ["--no_figures"]},
}
# world-size flags of each generator (with how many values they take), dropped before the tiny ones are added
WORLD_FLAGS = {"--num_classes": 1, "--train_per_class": 1, "--val_per_class": 1, "--test_per_class": 1,
               "--n_codes": 1, "--n_background": 1, "--n_distractors": 1, "--object_size": 2, "--patch_size": 1,
               "--neutral_images": 1}


def _drop(argv: list[str], flags: dict) -> list[str]:
    out, i = [], 0
    while i < len(argv):
        if argv[i] in flags:
            i += 1 + flags[argv[i]]
        else:
            out.append(argv[i])
            i += 1
    return out


def substitute(script: Path, argv: list[str]) -> list[str]:
    """The documented ``argv`` of ``script`` with the world shrunk as ``SUBSTITUTIONS`` says."""
    rule = SUBSTITUTIONS.get((script.parent.name, script.name)) or SUBSTITUTIONS.get(script.name) or {}
    argv = list(argv)
    source = argv[argv.index("--source") + 1] if "--source" in argv[:-1] else "synthetic"
    if "world" in rule and source == "synthetic":
        argv = _drop(argv, WORLD_FLAGS) + rule["world"]
    for flag, cap in rule.get("caps", {}).items():
        if flag in argv:
            k = argv.index(flag) + 1
            argv[k] = str(min(type(cap)(argv[k]), cap))
    add = rule.get("add", [])
    starts = [k for k, a in enumerate(add) if a.startswith("--")] + [len(add)]
    for k, nxt in zip(starts, starts[1:]):  # each flag with its values
        if add[k] not in argv:
            argv += add[k:nxt]
    return argv


# ----------------------------------------------------------------------------- blocks

@dataclass
class Block:
    page: Path
    line: int  # of the opening fence
    text: str
    mode: str  # "run", "fresh", "twice" or "parse-only"
    reason: str

    def where(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


MARKER = re.compile(r"<!--\s*docs-test:\s*(parse-only|fresh|twice)\s*(?:\((.*)\))?\s*-->")


def bash_blocks(page: Path) -> list[Block]:
    """The ```bash blocks of a markdown page with the docs-test marker (if any) on the line before each."""
    lines, blocks, i = page.read_text().splitlines(), [], 0
    while i < len(lines):
        if lines[i].strip() == "```bash":
            j = next(k for k in range(i + 1, len(lines)) if lines[k].strip() == "```")
            prev = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
            m = MARKER.search(prev)
            blocks.append(Block(page, i + 1, "\n".join(lines[i + 1:j]) + "\n", m.group(1) if m else "run",
                                (m.group(2) or "").strip() if m else ""))
            i = j
        i += 1
    return blocks


def _fail(block: Block, what: str, detail: str = "") -> None:
    pytest.fail(f"{block.where()} ({block.mode}): {what}\n--- block ---\n{block.text}--- output ---\n{detail[-6000:]}",
                pytrace=False)


# ----------------------------------------------------------------------------- run blocks

VENV_ACTIVATE = ".venv/bin/activate"  # what `make` creates (VENV ?= .venv) and the README's block activates
PRELUDE = r'''
set -eo pipefail
python() { printf '%s\0' "$PWD" "$#" "$@" >> "$DOCS_TEST_LOG"; }
python3() { python "$@"; }
source() {  # the README's `source .venv/bin/activate`: this test's python already has cortex; other files as bash
  if [ "$1" = .venv/bin/activate ] && [ "$PWD" = "$DOCS_TEST_WORK" ]; then return 0; fi
  builtin source "$@"
}
'''


def make_workdir(tmp: Path) -> Path:
    """A copy of the experiment folders' scripts (no data), in which ``--root`` defaults resolve to the copy."""
    tmp.mkdir(parents=True, exist_ok=True)
    for name in EXPERIMENTS:
        shutil.copytree(REPO / name, tmp / name, ignore=lambda d, names: [n for n in names if n in SKIP_COPY])
    return tmp


def record(block: Block, work: Path) -> list[tuple[Path, list[str]]]:
    """Run the block in bash with ``python`` recording; return the (cwd, argv) of each python call."""
    log = work / ".docs_test_log"
    log.write_bytes(b"")
    script = work / ".docs_test_block.sh"
    script.write_text(PRELUDE + f"cd {shlex.quote(str(work))}\n" + block.text)
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True,
                       env={**os.environ, "DOCS_TEST_LOG": str(log), "DOCS_TEST_WORK": str(work)}, timeout=60)
    if r.returncode:
        _fail(block, f"bash exited with {r.returncode}", r.stdout + r.stderr)
    parts, calls = log.read_bytes().split(b"\0")[:-1], []
    while parts:
        cwd, n = parts[0].decode(), int(parts[1])
        calls.append((Path(cwd), [p.decode() for p in parts[2:2 + n]]))
        parts = parts[2 + n:]
    return calls


def replay(block: Block, calls: list[tuple[Path, list[str]]]) -> None:
    """Run each recorded ``python script.py ...`` in-process, from its folder, with the substitutions."""
    assert calls, f"{block.where()}: the block runs no python command; mark it parse-only or remove it"
    here = os.getcwd()
    for cwd, argv in calls:
        if not argv or argv[0].startswith("-"):
            _fail(block, f"`python {' '.join(argv)}`: only `python script.py ...` can run in a docs block")
        script = (cwd / argv[0]).resolve()
        if not script.exists():
            _fail(block, f"`python {' '.join(argv)}` (in {cwd}): {argv[0]} does not exist")
        args = substitute(script, argv[1:])
        out, t = io.StringIO(), time.time()
        try:
            os.chdir(cwd)
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                run_script(script, args)
        except BaseException as e:  # SystemExit from argparse included
            if isinstance(e, KeyboardInterrupt):
                raise
            _fail(block, f"`python {' '.join(argv)}` failed (in {cwd.name}/)\n  ran as: python {argv[0]} "
                         f"{' '.join(args)}", out.getvalue() + "".join(traceback.format_exception(e)))
        finally:
            os.chdir(here)
        print(f"{time.time() - t:6.1f} s  {block.where()}  python {argv[0]} {' '.join(args)}")


# ----------------------------------------------------------------------------- parse-only blocks

def _commands(text: str):
    """Simple commands of a shell block, with ``VAR=value`` assignments expanded: lists of words."""
    env: dict[str, str] = {}
    text = re.sub(r"\\\n", " ", text)
    for line in text.splitlines():
        line = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), line)
        lex = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lex.whitespace_split, lex.commenters = True, "#"
        cmd: list[str] = []
        for tok in list(lex) + [";"]:
            if tok and set(tok) <= set(";&|"):
                while cmd and re.fullmatch(r"[A-Za-z_]\w*=.*", cmd[0]):
                    k, v = cmd.pop(0).split("=", 1)
                    if not cmd:
                        env[k] = v
                if cmd and cmd[0] == "export":
                    for kv in cmd[1:]:
                        if "=" in kv:
                            env[kv.split("=", 1)[0]] = kv.split("=", 1)[1]
                elif cmd:
                    yield cmd[1:] if cmd[0] == "sudo" else cmd
                cmd = []
            else:
                cmd.append(tok)


def _parse(block: Block, script: Path, argv: list[str], shown: str) -> None:
    if not script.exists():
        _fail(block, f"`{shown}`: {script} does not exist")
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            load_script(script).get_args_parser().parse_args(argv)
    except SystemExit:
        _fail(block, f"`{shown}`: {script.relative_to(REPO)} does not accept these flags", err.getvalue())


def _bash_n(block: Block, path: Path, shown: str) -> None:
    if not path.exists():
        _fail(block, f"`{shown}`: {path} does not exist")
    r = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    if r.returncode:
        _fail(block, f"`{shown}`: bash -n {path} failed", r.stderr)


def check_parse_only(block: Block) -> int:
    """Check a block that cannot run here; returns the number of commands checked."""
    r = subprocess.run(["bash", "-n"], input=block.text, capture_output=True, text=True)
    if r.returncode:
        _fail(block, "bash -n: syntax error", r.stderr)
    cwd, checked = REPO, 0
    makefile = (REPO / "Makefile").read_text()
    for cmd in _commands(block.text):
        shown, name = " ".join(cmd), Path(cmd[0]).name
        if cmd[0] == "cd":
            cwd = (cwd / cmd[1]).resolve() if len(cmd) > 1 else REPO
        elif name in ("python", "python3"):
            if cmd[1:3] == ["-m", "pytest"]:
                for t in (a for a in cmd[3:] if not a.startswith("-")):
                    assert (cwd / t.split("::")[0]).exists(), f"{block.where()}: `{shown}`: {t} does not exist"
            else:
                _parse(block, (cwd / cmd[1]).resolve(), cmd[2:], shown)
            checked += 1
        elif cmd[0] == "sbatch":
            k = next((i for i, a in enumerate(cmd) if a.endswith(".sbatch")), None)
            if k is None:
                _fail(block, f"`{shown}`: no .sbatch template")
            template = (cwd / cmd[k]).resolve()
            _bash_n(block, template, shown)
            m = re.search(r'cortex_run "\$PYTHON" (\S+\.py)', template.read_text())
            folder = REPO / {"vqgan": "VQGAN_explanation", "dalle": "Dalle_explanation"}[template.parent.name]
            target = next(folder.rglob(m.group(1)))
            _parse(block, target, cmd[k + 1:], shown)
            checked += 1
        elif cmd[0].endswith(".sh"):
            _bash_n(block, (cwd / cmd[0]).resolve(), shown)
            checked += 1
        elif cmd[0] == "make":
            for target in cmd[1:]:
                if "=" not in target and not re.search(rf"^{re.escape(target)}:", makefile, re.M):
                    _fail(block, f"`{shown}`: the Makefile has no target {target}")
            checked += 1
    return checked


# ----------------------------------------------------------------------------- the tests

@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_documented_commands_run(page, tmp_path):
    """Every ```bash block of the page runs (or, where marked, parses) as documented."""
    blocks = bash_blocks(page)
    work, n_work = None, 0
    for block in blocks:
        if block.mode == "parse-only":
            assert block.reason, f"{block.where()}: say why the block cannot run: parse-only (the reason)"
            assert check_parse_only(block), f"{block.where()}: a parse-only block must name a script or target"
            continue
        if work is None or block.mode == "fresh":
            n_work += 1
            work = make_workdir(tmp_path / f"work{n_work}")
        replay(block, record(block, work))
        if block.mode == "twice":  # pasted again over its own outputs (as over the demo's)
            replay(block, record(block, work))


def test_pages_have_blocks_and_valid_markers():
    """The pages the README links exist; every docs-test marker sits right before a ```bash block."""
    names = {"SPEC", "real_vqgan_data", "attributions", "bias_detection", "evaluation", "cluster", "benchmarks",
             "development"}
    assert names <= {p.stem for p in DOCS}
    assert sum(len(bash_blocks(p)) for p in DOCS) >= 15
    for page in DOCS:
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            if line.lstrip().startswith("<!--") and "docs-test:" in line:
                assert MARKER.search(line), f"{page.name}:{i + 1}: malformed marker {line!r}"
                nxt = next(l for l in lines[i + 1:] if l.strip())
                assert nxt.strip() == "```bash", f"{page.name}:{i + 1}: the marker is not right before a ```bash block"


def test_substitution_table():
    """The table only shrinks sizes: world flags replaced, caps applied, missing flags added, others kept."""
    gen = REPO / "VQGAN_explanation" / "generate_dataset.py"
    got = substitute(gen, ["--num_classes", "5", "--object_size", "4", "6", "--layout", "compact"])
    assert got == ["--layout", "compact", *TINY_VQGAN_WORLD]
    assert substitute(gen, ["--source", "images", "--image_dir", "x"]) == ["--source", "images", "--image_dir", "x"]
    tis = REPO / "VQGAN_explanation" / "TIS_computation.py"
    assert substitute(tis, ["--model", "1", "--nsamples", "20"]) == ["--model", "1", "--nsamples", "2", "--ig_steps", "2"]
    train = REPO / "Dalle_explanation" / "train.py"
    assert substitute(train, ["--width", "8", "--epochs", "10"]) == ["--width", "8", "--epochs", "1"]


def test_parse_only_catches_a_wrong_flag(tmp_path):
    """A renamed flag in a parse-only block fails with the block, the command and argparse's message."""
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: parse-only (test) -->\n```bash\ncd VQGAN_explanation\n"
                    "python train.py --model 1 --no_such_flag 3\n```\n")
    (block,) = bash_blocks(page)
    block.page = REPO / "README.md"  # only for the message
    with pytest.raises(pytest.fail.Exception) as e:
        check_parse_only(block)
    assert "--no_such_flag" in str(e.value) and "python train.py --model 1" in str(e.value)


def test_readme_is_short_and_whole():
    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert "<!-- demo-report:start -->" in text and "<!-- demo-report:end -->" in text
    assert "Machine:" in text
    # the pipeline block pastes as one piece: no `cd eval` without coming back before the next step's cd
    run = [b for b in bash_blocks(REPO / "README.md") if b.mode in ("run", "twice")]
    assert run and "cd explanation_evaluation" not in run[0].text
    # ... into a new shell after `make demo`: it activates the venv `make` creates before its first python
    first = [ln.split("#")[0].strip() for ln in run[0].text.splitlines() if ln.split("#")[0].strip()]
    assert first[0] == f"source {VENV_ACTIVATE}", first[0]
    assert re.search(r"^VENV\s*\?=\s*\.venv\s*$", (REPO / "Makefile").read_text(), re.M)
    assert "`.venv/bin/python`" in text  # the other way, said in the prose
    for page in DOCS:  # no section starts mid-sentence (the old README's 'driver behind both folders')
        for para in re.split(r"\n\s*\n", page.read_text()):
            first = para.lstrip().splitlines()[0] if para.strip() else ""
            assert not re.match(r"[a-z][a-z_]* behind", first), f"{page.name}: paragraph starts mid-sentence: {first!r}"


def test_links_resolve():
    """Relative links of README and docs point to files that exist, and #anchors to headings that exist."""
    def anchors(path: Path) -> set[str]:
        out = set()
        for h in re.findall(r"^#+ (.*)$", path.read_text(), re.M):
            out.add(re.sub(r"[^\w\- ]", "", h.strip().lower().replace("`", "")).replace(" ", "-"))
        return out

    for page in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to missing {target}"
            if anchor and dest.suffix == ".md":
                assert anchor in anchors(dest), f"{page.name}: link {target}: no heading #{anchor} in {dest.name}"


def test_spec_sections_cited_by_the_code_exist():
    """Each `SPEC §N` (and `§1 step n`) the code cites is a section of docs/SPEC.md that covers the topic."""
    spec = (REPO / "docs" / "SPEC.md").read_text()
    sections = dict(re.findall(r"^## §(\d) (.*)$", spec, re.M))
    assert sorted(sections) == [str(i) for i in range(1, 8)]
    cited, steps = set(), set()
    for folder in ("cortex", "VQGAN_explanation", "Dalle_explanation"):
        for f in (REPO / folder).rglob("*.py"):
            for m in re.finditer(r"SPEC §(\d)(?: step (\d))?", f.read_text()):
                cited.add(m.group(1))
                if m.group(2):
                    steps.add(m.group(2))
    assert cited and cited <= set(sections), f"cited {sorted(cited)}, SPEC.md has {sorted(sections)}"
    method = spec.split("## §1")[1].split("## §2")[0]
    for n in steps:
        assert re.search(rf"^{n}\. \*\*", method, re.M), f"SPEC §1 has no step {n}"
    # what the citing code expects to find there
    for n, words in {"3": ["filename,label,indices", "Total Images", "Token,Count", "image_size // 16"],
                     "4": ["Net1", "Net4", "state_dict_shapes.json", "--width"],
                     "5": ["sample_image_level_results.csv", "Avg_Diff_Target", "codebook_level_results",
                           "Cliff's delta", "Evaluators"],
                     "6": ["cin_transformer", "ground_truth.json", "scattered", "neutral-prompt"],
                     "7": ["noise_scope", "Deliberate differences"]}.items():
        body = spec.split(f"## §{n}")[1].split("\n## §")[0]
        for w in words:
            assert w in body, f"SPEC §{n} does not mention {w!r}"


def test_check_readme_demo(tmp_path):
    """scripts/check_readme_demo.py: agrees with its own copy, finds a changed number and a missing column,
    and --update copies the report's tables into the README."""
    mod = load_script(REPO / "scripts" / "check_readme_demo.py")
    readme = (REPO / "README.md").read_text()
    i, j = mod.readme_region(readme)
    region = readme[i:j].strip("\n")
    report = "# CORTEX demo report\n\nintro\n\n" + re.sub(r"^### ", "## ", region, flags=re.M) + "\n\n## Figures\n"
    rp, rd = tmp_path / "demo_report.md", tmp_path / "README.md"
    rp.write_text(report)
    rd.write_text(readme)
    assert mod.check(rd, rp) == []
    first = re.search(r"\| (\d+\.\d)% \|", report).group(0)  # the first accuracy cell, whatever its value
    changed = "| 999.9% |"
    rp.write_text(report.replace(first, changed, 1))
    problems = mod.check(rd, rp)
    assert len(problems) == 1 and "999.9%" in problems[0] and mod.check(rd, rp, structure_only=True) == []
    rp.write_text(report.replace("| top-1 | top-3 |", "| top-1 |", 1))
    assert any("columns differ" in p for p in mod.check(rd, rp, structure_only=True))
    rp.write_text(report.replace(first, changed, 1).replace("Machine: ", "Machine: other CPU, "))
    mod.update(rd, rp)
    assert mod.check(rd, rp) == [] and "Machine: other CPU" in rd.read_text()
    assert rd.read_text().count("<!-- demo-report:start -->") == 1
    args = mod.get_args_parser().parse_args(["--readme", str(rd), "--report", str(tmp_path / "missing.md")])
    with pytest.raises(Exception, match="make demo"):
        mod.main(args)


def test_code_points_to_pages_that_exist():
    """Messages and comments of the code that send the reader to a docs page name a page that exists."""
    for folder in ("cortex", "VQGAN_explanation", "Dalle_explanation", "scripts", "bench", "slurm"):
        for f in (REPO / folder).rglob("*"):
            if f.suffix in (".py", ".sh", ".sbatch"):
                for page in re.findall(r"docs/([\w.-]+\.(?:md|ipynb))", f.read_text()):
                    assert (REPO / "docs" / page).exists(), f"{f.relative_to(REPO)} cites docs/{page}, which is missing"


def _section(text: str, heading: str) -> str:
    """The body of the markdown section whose heading line is ``heading`` (up to the next heading of its level)."""
    level = heading.split(" ")[0]
    body = text.split(heading + "\n", 1)[1]
    m = re.search(rf"^{re.escape(level)} ", body, re.M)
    return body[:m.start()] if m else body


def test_readme_says_what_the_scripts_guarantee():
    """Issue 12: a short README section names the faults handled and links to SPEC §5's full list."""
    body = _section((REPO / "README.md").read_text(), "## What the scripts guarantee").strip()
    assert 8 <= len(body.splitlines()) <= 15
    for word in ("--resume", "--overwrite", "--allow_partial", "last.prev.ckpt", "exit status 2", "--debug",
                 "docs/SPEC.md#what-the-scripts-guarantee"):
        assert word in body, word
    spec = _section((REPO / "docs" / "SPEC.md").read_text(), "### What the scripts guarantee")
    for word in ("label_k.csv.lock", "run_id", "--overwrite", "--allow_partial", "NaN", "float32", "prefix",
                 "last.prev.ckpt", ".generating", "umask", "exit", "--debug", "chance"):
        assert word in spec, word


def test_one_table_of_deliberate_differences_with_the_current_rules():
    """Issue 13: SPEC §7 has one table of the remaining differences; the rules now matched are not listed."""
    spec = (REPO / "docs" / "SPEC.md").read_text()
    diffs = _section(spec, "### Deliberate differences from the authors' scripts")
    tables = re.findall(r"(?:^\|.*\|\n)+", diffs, re.M)
    assert len(tables) == 1
    rows = tables[0]
    for word in ("--noise_scope authors", "cliff_delta_seed", "p_value", "os.listdir", "ascending label order",
                 "across the 256 positions", "in batches", "seeded by `--seed`", "float64", "an error naming",
                 "source.json", "loss_curves.png", "metrics.csv", "paired"):
        assert word in rows, word
    # changed to the authors' rules: no page may still state the old ones
    stale = ["unmasked − masked", "then token id ascending", "one permutation per image, seeded",
             "Random positions are seeded per image", "default `.`", "logs/<bias_type>", "0600"]
    for page in DOCS:
        text = page.read_text()
        for s in stale:
            assert s not in text, (page.name, s)
    assert "Diff = mean(masked) −\n  mean(unmasked)" in (REPO / "docs" / "evaluation.md").read_text()


def test_placeholders_filled_and_lead_markers_left():
    """Issues 14-17: the lead's placeholders are replaced; the markers for the numbers still to paste remain."""
    texts = {p.name: p.read_text() for p in DOCS}
    assert not any("The lead adds" in t or "The lead extends" in t for t in texts.values())
    bench = texts["benchmarks.md"]
    assert "<!-- numbers: bench_stats -->" in bench and "<!-- numbers: gpu_check -->" in bench
    assert "bench/gpu_check.sh" in bench and "H100" in bench
    sig = _section(texts["attributions.md"], "## Statistics and significance")
    for word in ("tis_significance.csv", "--significant_only", "--null_classes", "concept_recovery_significance.csv",
                 "model_randomisation.py", "Benjamini-Hochberg"):
        assert word in sig, word
    adapters = _section(texts["real_vqgan_data.md"], "## Other tokenizers (adapters)")
    for word in ("CallableTokenizer", "--tokenizer diffusers", "token_gallery.py", "--vq diffusers",
                 "### Other token grids and code sizes", "grid_size", "code_dim", "tests/test_grids.py"):
        assert word in adapters, word
    for word in ("p_value", "cliff_delta_ci_low", "magnitude", "['12', '7']", "--allow_partial"):
        assert word in texts["bias_detection.md"], word
    for word in ("label_k.csv.lock", "run_id", "last.prev.ckpt", "--overwrite"):
        assert word in texts["cluster.md"], word
    for word in ("run_main(main, get_args_parser)", "positive_int", "quiet_third_party", "--verbose", "--debug"):
        assert word in texts["development.md"], word
