"""The claas-feedback plugin type-checks (tsc --strict) against the plugin SDK types of the installed OpenClaw, so a
field the plugin reads from a hook event or a command context is one OpenClaw declares. TypeScript is installed
next to OpenClaw in the cache folder (once)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.openclaw.conftest import PLUGIN, OpenClawInstall

pytestmark = pytest.mark.slow
TYPESCRIPT = "typescript@5.9.3"


def _tsc(install: OpenClawInstall) -> Path:
    home = install.entry.parents[3] / "typescript-5.9.3"  # beside openclaw-<version> in the cache folder
    tsc = home / "node_modules" / "typescript" / "bin" / "tsc"
    if not tsc.exists():
        npm = install.node.parents[1] / "lib" / "node_modules" / "npm" / "bin" / "npm-cli.js"
        env = {**os.environ, "PATH": f"{install.node.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        result = subprocess.run([str(install.node), str(npm), "install", "--prefix", str(home), "--no-audit",
                                 "--no-fund", "--loglevel=error", TYPESCRIPT], capture_output=True, text=True,
                                env=env, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"TypeScript could not be installed from npm: {result.stderr[-800:]}")
    return tsc


def _check(install: OpenClawInstall, source: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    sdk = install.entry.parent / "dist" / "plugin-sdk" / "plugin-entry.d.ts"
    config = {
        "compilerOptions": {"target": "es2022", "module": "nodenext", "moduleResolution": "nodenext",
                            "strict": True, "noEmit": True, "skipLibCheck": True, "types": [],
                            "paths": {"openclaw/plugin-sdk/plugin-entry": [str(sdk)]}},
        "files": [str(source)],
    }
    tsconfig = tmp_path / "tsconfig.json"
    tsconfig.write_text(json.dumps(config))
    return subprocess.run([str(install.node), str(_tsc(install)), "-p", str(tsconfig)], capture_output=True,
                          text=True, timeout=300)


def test_the_plugin_type_checks_against_openclaws_sdk(openclaw_install: OpenClawInstall, tmp_path: Path) -> None:
    result = _check(openclaw_install, PLUGIN / "index.ts", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.ts"  # the check can fail: a field no hook event has
    broken.write_text((PLUGIN / "index.ts").read_text().replace("event.assistantTexts", "event.assistantText"))
    failed = _check(openclaw_install, broken, tmp_path)
    assert failed.returncode != 0 and "assistantText" in failed.stdout
