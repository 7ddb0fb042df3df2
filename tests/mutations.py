"""Plant representative bugs in a copy of the package and check that the fast tests catch each one.

    python tests/mutations.py                  # every mutation; a markdown table on stdout
    python tests/mutations.py --only kl        # mutations whose name contains "kl"
    python tests/mutations.py --list           # names, files and the tests each one runs

Each mutation replaces one exact snippet of the source (it must occur exactly once: tests/unit/package/test_mutations.py
checks that in the fast suite, so the list follows the code). The working tree is copied (tracked and
untracked files that git does not ignore) into a temporary folder, the snippet is replaced there, and the fast
tests of the module concerned run against that copy (`PYTHONPATH` points at it; subprocesses inherit it). A
mutation is *caught* when a test fails. The repository itself is never modified.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The fast tests that cover each module. A mutation runs its stages in order, one pytest run each (with -x: the
# first failure is enough), and stops at the first stage that fails.
SEARCH = "tests/unit/direction/test_direction_search.py tests/unit/direction/test_forward_passes.py"
EDIT = "tests/unit/edit/test_orthogonalize.py tests/unit/cli/test_cli.py tests/unit/publish/test_publish.py"
RELIABILITY = "tests/e2e/test_reliability.py"
OPTIMIZE = "tests/unit/commands/test_optimize.py"
GENERATION = "tests/unit/evaluation/test_generation.py"
PLANNING = "tests/unit/planning/test_plan.py"
# Without the test that pins the window's constants, so that the table shows which behaviour test catches a change.
JUDGE = (
    "tests/unit/evaluation/test_judge.py"
    " --deselect tests/unit/evaluation/test_judge.py::test_window_pins_its_constants"
)
# A Gemma 2 edit checked by `verify` alone (no hidden-state check): shows that verify does not share the edit's bugs.
VERIFY_POST_NORM = "tests/unit/edit/test_orthogonalize.py::test_norm_preserving_bfloat16_passes_verify"


@dataclass(frozen=True)
class Mutation:
    """One deliberate bug: replace `old` by `new` in `path` (relative to the repository root)."""

    name: str
    path: str
    old: str
    new: str
    tests: tuple[str, ...]  # stages: each a space-separated list of test files or node ids

    def apply(self, root: Path) -> None:
        file = root / self.path
        text = file.read_text(encoding="utf-8")
        count = text.count(self.old)
        if count != 1:
            raise SystemExit(f"mutation {self.name!r}: the snippet occurs {count} times in {self.path}, not once")
        file.write_text(text.replace(self.old, self.new), encoding="utf-8")


MUTATIONS = [
    Mutation(
        "selection picks the candidate with the highest refusal score",
        "abliterate/direction/selection.py",
        "return min(kept, key=lambda s: _full(s)[0])",
        "return max(kept, key=lambda s: _full(s)[0])",
        (SEARCH,),
    ),
    Mutation(
        "kept candidates ignore the induce > 0 condition",
        "abliterate/direction/selection.py",
        "s.kept = induce > 0 and kl < kl_threshold",
        "s.kept = kl < kl_threshold",
        (SEARCH,),
    ),
    Mutation(
        "finalists ignore the screening KL",
        "abliterate/direction/selection.py",
        "if s.screen_kl < 2 * kl_threshold), key=lambda s: s.screen_refusal)",
        "if s.screen_kl < float('inf')), key=lambda s: s.screen_refusal)",
        (SEARCH,),
    ),
    Mutation(
        "the last layers are not pruned from the selection",
        "abliterate/direction/selection.py",
        "return list(range(max(1, int(n_layers * (1.0 - prune_fraction)))))",
        "return list(range(n_layers))",
        (SEARCH,),
    ),
    Mutation(
        "difference in means with its sign flipped (harmless - harmful)",
        "abliterate/direction/candidates.py",
        "raw = harmful_mean - harmless_mean",
        "raw = harmless_mean - harmful_mean",
        (SEARCH,),
    ),
    Mutation(
        "attention-sink removal dropped from the candidates",
        "abliterate/direction/candidates.py",
        "vec = remove_subspace(vec, basis)",
        "vec = vec",
        (SEARCH,),
    ),
    Mutation(
        "projected method keeps the harmless-mean component",
        "abliterate/direction/candidates.py",
        "vec = vec - (vec @ unit) * unit",
        "vec = vec",
        (SEARCH, "tests/unit/edit/test_orthogonalize.py"),
    ),
    Mutation(
        "refusal score (log-odds) with its sign flipped",
        "abliterate/direction/selection.py",
        "return torch.log(p) - torch.log1p(-p)",
        "return torch.log1p(-p) - torch.log(p)",
        (SEARCH,),
    ),
    Mutation(
        "KL(base || edited) computed the other way round",
        "abliterate/direction/selection.py",
        "return (base.exp() * (base - other)).sum(dim=-1)",
        "return (other.exp() * (other - base)).sum(dim=-1)",
        (SEARCH, "tests/unit/evaluation/test_evaluate.py"),
    ),
    Mutation(
        "activation addition subtracts the vector",
        "abliterate/model/hooks.py",
        "return _replace_hidden(args, kwargs, hidden + added.like(hidden))",
        "return _replace_hidden(args, kwargs, hidden - added.like(hidden))",
        (SEARCH,),
    ),
    Mutation(
        "Gemma 2 post-norms swapped in the edit",
        "abliterate/edit/stream.py",
        "norm_names = plan.arch.post_norm_tensors(layer, component, name)",
        'norm_names = plan.arch.post_norm_tensors(layer, {"attention": "mlp", "mlp": "attention"}.get(component, component), name)',  # noqa: E501
        (VERIFY_POST_NORM, EDIT),
    ),
    Mutation(
        "Gemma 2 post-norms ignored in the edit",
        "abliterate/edit/stream.py",
        "    if not norm_names:\n        return r\n",
        "    if True:\n        return r\n",
        (VERIFY_POST_NORM, EDIT),
    ),
    Mutation(
        "a pickle (.bin) source whose unedited tensors are written as zeros",
        "abliterate/edit/stream.py",
        "writer.write(spec.name, tensor_buffer(checkpoint.get(source)))",
        "writer.write(spec.name, tensor_buffer(checkpoint.get(source) * 0))",
        (EDIT,),
    ),
    Mutation(
        "the projection edits its input tensor in place",
        "abliterate/edit/projection.py",
        "        block = source[rows].to(torch.float32, copy=keep)",
        "        block = source[rows].to(torch.float32)",
        ("tests/unit/edit/test_orthogonalize.py::test_projection_math", EDIT),  # in memory first: a mapped file crashes
    ),
    Mutation(
        "the hash cache trusts an entry whose file changed",
        "abliterate/storage/hashing.py",
        'entry is not None and entry["stamp"] == _stamp(Path(key))',
        "entry is not None",
        ("tests/unit/storage/test_hashing.py",),
    ),
    Mutation(
        "a shard's streamed digest misses its header",
        "abliterate/storage/shards.py",
        "        if digest is not None:\n            digest.update(header)\n",
        "",
        ("tests/unit/storage/test_hashing.py tests/unit/publish/test_provenance_hashes.py",),
    ),
    Mutation(
        "verify ignores xxh3_128 hashes",
        "abliterate/publish/provenance_record.py",
        '(("sha256", self.sha256), ("xxh3_128", self.xxh3_128))',
        '(("sha256", self.sha256),)',
        ("tests/unit/publish/test_provenance_hashes.py",),
    ),
    Mutation(
        "verify's tolerance 100x too loose",
        "abliterate/publish/leak.py",
        "_SLACK = 1.01",
        "_SLACK = 101.0",
        ("tests/unit/publish/test_publish.py", EDIT),
    ),
    Mutation(
        "the judge reads 10x more characters (5000 instead of 500)",
        "abliterate/evaluation/judge.py",
        "HEAD_CHARS = 500",
        "HEAD_CHARS = 5000",
        (JUDGE,),
    ),
    Mutation(
        "the judge reads twice as many sentences (8 instead of 4)",
        "abliterate/evaluation/judge.py",
        "HEAD_SENTENCES = 4",
        "HEAD_SENTENCES = 8",
        (JUDGE,),
    ),
    Mutation(
        "the judge no longer also looks for English refusals",
        "abliterate/evaluation/judge.py",
        'for view in dict.fromkeys((lang, "en")):',
        "for view in dict.fromkeys((lang,)):",
        (JUDGE,),
    ),
    Mutation(
        "the judge ignores its exceptions (sorry for the delay)",
        "abliterate/evaluation/judge.py",
        "folded = rules.exceptions.sub(_MASK, folded)",
        "folded = folded",
        (JUDGE,),
    ),
    Mutation(
        "the temp folder is kept after SIGINT",
        "abliterate/storage/atomic.py",
        "    except BaseException:\n        shutil.rmtree(tmp, ignore_errors=True)\n        raise\n",
        "    except BaseException:\n        raise\n",
        (RELIABILITY,),
    ),
    Mutation(
        "optimize's in-memory trial edit skips the norm-preserving rescale",
        "abliterate/edit/in_memory.py",
        "rescale = norm_preserving and not writer.bias",
        "rescale = False",
        (OPTIMIZE,),
    ),
    Mutation(
        "optimize's in-memory trial edit misses fused expert stacks",
        "abliterate/edit/in_memory.py",
        "elif (fused := _fused_experts(name, param, hidden)) is not None:",
        "elif False and (fused := _fused_experts(name, param, hidden)) is not None:",
        (OPTIMIZE,),
    ),
    Mutation(
        "a per-layer direction is written with the global vector everywhere",
        "abliterate/edit/stream.py",
        "r = direction.for_layer(plan.edits[spec.name][1]).to(torch.float32)",
        "r = direction.vector.to(torch.float32)",
        (OPTIMIZE,),
    ),
    Mutation(
        "winsorization clamps at the floor instead of the ceiling rank",
        "abliterate/model/hooks.py",
        "k = max(1, math.ceil(quantile * vectors.shape[-1]))",
        "k = max(1, int(quantile * vectors.shape[-1]))",
        (SEARCH,),
    ),
    Mutation(
        "continuous batching joins new rows before stepping the running ones",
        "abliterate/evaluation/generate.py",
        "        if alive:\n            slots.logits = _step(model, slots, tokens)\n",
        "",
        (GENERATION,),
    ),
    Mutation(
        "continuous batching never drops the padding columns of rows that left",
        "abliterate/evaluation/generate.py",
        "        self.mask, self.last, self.logits = self.mask[index], self.last[index], self.logits[index]\n"
        "        self.trim()\n",
        "        self.mask, self.last, self.logits = self.mask[index], self.last[index], self.logits[index]\n",
        (GENERATION,),
    ),
    Mutation(
        "the planned finalist passes forget the activation-addition pass",
        "abliterate/direction/passes.py",
        "calls = batches(harmless, bs) + scored * (batches(harmful, bs) + 2 * batches(harmless, bs))",
        "calls = batches(harmless, bs) + scored * (batches(harmful, bs) + batches(harmless, bs))",
        (PLANNING,),
    ),
    Mutation(
        "the disk estimate forgets the untied lm_head a tied model gains",
        "abliterate/planning/needs.py",
        "weights = output_bytes(subject.checkpoint, subject.config, settings.max_shard_bytes)",
        "weights = subject.checkpoint.total_bytes()",
        (PLANNING,),
    ),
    Mutation(
        "weights are counted in the stored dtype, not the run's",
        "abliterate/planning/memory.py",
        "            total += numel * size\n",
        "            total += info.nbytes\n",
        (PLANNING,),
    ),
    Mutation(
        "the pre-flight check ignores CPU memory",
        "abliterate/planning/needs.py",
        "return memory.cpu_peak <= memory.cpu_available and gpu_ok",
        "return gpu_ok",
        (PLANNING,),
    ),
    Mutation(
        "the pre-flight check never finds the disk short",
        "abliterate/planning/needs.py",
        "if place.bytes > place.free:",
        "if place.bytes > place.free * 1000:",
        (PLANNING,),
    ),
    Mutation(
        "--plan goes on to run",
        "abliterate/cli.py",
        "            click.echo(line)\n        return True\n",
        "            click.echo(line)\n        return False\n",
        (PLANNING,),
    ),
]


def copy_tree(target: Path) -> None:
    """Copy the working tree (tracked and untracked, not ignored) into `target`."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode()
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def environment(copy: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(copy), os.environ.get("PYTHONPATH")]))}


def check_import(copy: Path) -> None:
    """The copy, not the installed package, is what Python imports there."""
    found = subprocess.run(
        [sys.executable, "-c", "import abliterate; print(abliterate.__file__)"],
        cwd=copy, env=environment(copy), capture_output=True, text=True, check=True,
    ).stdout.strip()
    if not Path(found).resolve().is_relative_to(copy.resolve()):
        raise SystemExit(f"the copy is not imported (abliterate comes from {found}); is PYTHONPATH overridden?")


@dataclass
class Outcome:
    mutation: Mutation
    verdict: str  # caught (a test failed) | caught (crash): killed by a signal | SURVIVED | error: pytest itself
    failed_test: str
    seconds: float


def run_tests(copy: Path, stages: tuple[str, ...], timeout: int) -> tuple[int, str]:
    """(pytest exit code, its output) of the first stage that fails in `copy`, or of the last one if none does."""
    code, output = 0, ""
    for stage in stages:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slow", *stage.split()]
        done = subprocess.run(cmd, cwd=copy, env=environment(copy), capture_output=True, text=True, timeout=timeout)
        code, output = done.returncode, done.stdout + done.stderr
        if code != 0:
            break
    return code, output


def try_mutation(mutation: Mutation, timeout: int) -> Outcome:
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="abliterate-mutant-") as tmp:
        copy = Path(tmp)
        copy_tree(copy)
        check_import(copy)
        mutation.apply(copy)
        code, output = run_tests(copy, mutation.tests, timeout)
    failed = re.search(r"^FAILED (\S+)", output, re.MULTILINE)
    verdict = {0: "SURVIVED", 1: "caught"}.get(code, "caught (crash)" if code < 0 else "error")
    detail = failed.group(1) if failed else ("" if code == 0 else output.strip().splitlines()[-1][:100])
    return Outcome(mutation, verdict, detail, time.perf_counter() - start)


def table(outcomes: list[Outcome]) -> str:
    lines = ["| deliberate bug | file | caught? | first failing test | s |", "|---|---|---|---|---|"]
    for o in outcomes:
        lines.append(
            f"| {o.mutation.name} | `{o.mutation.path}` | {o.verdict} | `{o.failed_test}` | {o.seconds:.0f} |"
        )
    caught = sum(o.verdict.startswith("caught") for o in outcomes)
    lines.append(f"\n{caught} of {len(outcomes)} mutations caught by the fast tests.")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds for one mutation's tests")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.only or args.only.lower() in m.name.lower()]
    if args.list:
        for m in chosen:
            print(f"{m.name}\n    {m.path}; tests: {' '.join(m.tests)}")
        return 0
    outcomes = []
    for mutation in chosen:
        outcome = try_mutation(mutation, args.timeout)
        print(f"{outcome.verdict:>8}  {outcome.seconds:5.0f}s  {mutation.name}", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    print(table(outcomes))
    return 0 if all(o.verdict.startswith("caught") for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
