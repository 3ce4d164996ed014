"""The seed's log: `BACKUP_ROOT/logs/<target>_<tier>_<YYYYMMDD>.log`, lines `[YYYY-MM-DD HH:MM:SS] message`.

The messages keep the seed's Portuguese wording ("Iniciando backup do banco de dados...",
"SUCCESS: Backup SQL criado", "Removidos N backup(s) antigo(s)") so existing greps and habits still work.
Lines are appended with O_APPEND, so steps of one run on different pool processes interleave safely.
"""

from __future__ import annotations

import logging
import os
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pgbeat.fsutil import FILE_MODE, private_dir

if TYPE_CHECKING:  # annotations only: the CLI's human_size must not import the pipeline's models
    from pgbeat.pipeline.record import Run
    from pgbeat.settings import Settings

log = logging.getLogger(__name__)


def human_size(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def log_path(settings: Settings, run: Run) -> Path:
    """Return the log file of `run`: one per target, tier and day (the day the run started)."""
    day = run.started_at.astimezone(settings.tz).strftime("%Y%m%d")
    return settings.backup_root / "logs" / f"{run.target}_{run.tier}_{day}.log"


def write(settings: Settings, run: Run, when: datetime, *messages: str) -> Path:
    """Append `messages` to the run's log file, each with the seed's timestamp prefix; return the path."""
    return append(settings, log_path(settings, run), when, *messages)


def append(settings: Settings, path: Path, when: datetime, *messages: str) -> Path:
    """Append `messages` to the log file `path` with the seed's `[YYYY-MM-DD HH:MM:SS]` prefix."""
    stamp = when.astimezone(settings.tz).strftime("%Y-%m-%d %H:%M:%S")
    data = "".join(f"[{stamp}] {m}\n" for m in messages).encode()
    try:
        private_dir(path.parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    except OSError as exc:  # a full disk must not hide the failure being reported
        log.warning("cannot write %s (%s): %s", path, exc.strerror, " | ".join(messages))
    return path


def step_lines(run: Run, step: str) -> list[str]:
    """Return the seed's lines for a finished step."""
    steps = run.steps
    if step == "dump" and steps.dump:
        return ["SUCCESS: Backup SQL criado", f"Tamanho do dump: {human_size(steps.dump.size)} "
                f"em {steps.dump.duration_s}s (servidor {steps.dump.server_version or '?'})"]
    if step == "compress" and steps.compress:
        if steps.compress.passthrough:
            return ["Compressão: formato já comprimido pelo pg_dump"]
        return [f"Compressão {steps.compress.codec}: {human_size(steps.compress.size)} "
                f"(razão {steps.compress.ratio}) em {steps.compress.duration_s}s"]
    if step == "verify" and steps.verify:
        return ["SUCCESS: Backup verificado com sucesso", f"MD5: {steps.verify.md5}", f"SHA-256: {steps.verify.sha256}"]
    if step == "upload" and steps.verify:
        return [f"Arquivo final: {run.final_path}", f"Tamanho: {human_size(steps.verify.size)}"]
    if step == "rotate" and steps.rotate:
        return [f"Removidos {len(steps.rotate.removed)} backup(s) antigo(s)"]
    return []


def start_lines(run: Run, describe: str) -> list[str]:
    return ["=" * 60, "Iniciando backup do banco de dados...", f"Tipo: {run.tier}", f"Banco: {describe}",
            f"Formato: {run.format}, compressão: {run.codec}", f"Arquivo: {run.name}", f"Run: {run.run_id}"]
