"""Where a study lives: Ray's experiment at ``STORAGE/NAME`` (a folder or a URI such as ``s3://``),
and the study's own files in a local :class:`~tune_cifar.study_folder.StudyFolder`.

For local storage the two are one folder. For a remote one, Ray writes its experiment (state,
trial folders, checkpoints) to the URI itself, while the tables, the Optuna database and the
plan are written locally (``studies/NAME``) and copied up when the driver stops
(:meth:`StudyStorage.sync`), down again before a ``--resume``.
"""

from __future__ import annotations

from pathlib import Path

from tune_cifar.cluster import is_remote_storage
from tune_cifar.errors import UsageError
from tune_cifar.study_folder import StudyFolder, trial_dirname

DEFAULT_STORAGE = "studies"


class StudyStorage:
    """The experiment's URI or folder (:attr:`experiment`) and the local study folder (:attr:`local`)."""

    def __init__(self, storage: str, name: str):
        if "/" in name or name in (".", "..") or not name.strip():
            raise UsageError(f"--name must be a plain folder name, got {name!r}")
        self.remote = is_remote_storage(storage)
        self.name = name
        self.storage = storage if self.remote else str(Path(storage.removeprefix("file://")).expanduser().resolve())
        self.experiment = f"{self.storage.rstrip('/')}/{name}"
        local = (Path(DEFAULT_STORAGE) / name).resolve() if self.remote else Path(self.experiment)
        self.local = StudyFolder(local)

    @property
    def is_default(self) -> bool:
        """Whether the study is in the default storage folder (a printed command can leave it out)."""
        return self.storage == str(Path(DEFAULT_STORAGE).resolve())

    def exists(self) -> bool:
        """Whether there is a study here already (a local folder holding more than a lock counts)."""
        if not self.remote:
            folder = self.local.path
            return folder.exists() and any(path.name != StudyFolder.LOCK for path in folder.iterdir())
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(self.experiment)
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound

    def sync(self, direction: str) -> None:
        """Copy the study's own files between the local folder and a remote storage (up or down)."""
        if not self.remote:
            return
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(self.experiment)
        local = pyarrow.fs.LocalFileSystem()
        self.local.path.mkdir(parents=True, exist_ok=True)
        for item in self.local.study_files():
            source, target = (str(self.local.path / item), f"{path}/{item}")
            source_fs, target_fs = local, fs
            if direction == "down":
                source, target, source_fs, target_fs = target, source, target_fs, source_fs
            info = source_fs.get_file_info(source)
            if info.type == pyarrow.fs.FileType.NotFound:
                continue
            if info.type == pyarrow.fs.FileType.Directory:
                target_fs.create_dir(target, recursive=True)
                pyarrow.fs.copy_files(source, target, source_filesystem=source_fs, destination_filesystem=target_fs)
            else:
                target_fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
                with source_fs.open_input_stream(source) as src, target_fs.open_output_stream(target) as dst:
                    dst.write(src.read())

    def has_ray_state(self) -> bool:
        """Whether Ray saved the experiment's state (written once trials run; ``tuner.pkl`` comes
        earlier): a driver killed during start-up leaves none."""
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(self.experiment)
        try:
            items = fs.get_file_info(pyarrow.fs.FileSelector(root))
        except FileNotFoundError:
            return False
        return any(item.base_name.startswith(StudyFolder.RAY_STATE_PREFIX) for item in items)

    def discard_unstarted(self) -> None:
        """Before starting a study whose first driver died in start-up: no trial can have reported
        (Ray never saved the experiment), so an Optuna database it may have created holds no result."""
        if self.local.files("trials"):
            raise UsageError(f"{self.local.path}: trial tables but no Ray experiment state; cannot resume it")
        for started in (*self.local.optuna_files, self.local.path / StudyFolder.RAY_TUNER):
            started.unlink(missing_ok=True)

    def remove_checkpoints_except(self, keep_trial: str) -> None:
        """Delete every trial's checkpoints but ``keep_trial``'s: a finished study's trials can no
        longer resume, and one checkpoint per trial is gigabytes on a real study."""
        import pyarrow.fs

        fs, root = pyarrow.fs.FileSystem.from_uri(self.experiment)
        for trial in fs.get_file_info(pyarrow.fs.FileSelector(root)):
            name = trial.base_name
            if trial.type != pyarrow.fs.FileType.Directory or not name.startswith("trial_"):
                continue
            if name == trial_dirname(keep_trial):
                continue
            for item in fs.get_file_info(pyarrow.fs.FileSelector(trial.path)):
                if item.type == pyarrow.fs.FileType.Directory and item.base_name.startswith("checkpoint_"):
                    fs.delete_dir(item.path)
