"""The wire protocol: generated code is fresh, messages round-trip, and the buf STANDARD conventions hold."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor

from megascope.protos import events, generate
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

FILES: list[FileDescriptor] = [telemetry_pb2.DESCRIPTOR, agent_pb2.DESCRIPTOR, worker_pb2.DESCRIPTOR]


@pytest.fixture
def protos_copy(tmp_path: Path) -> Path:
    """A copy of the sources and the committed generated code, safe to modify."""
    shutil.copytree(
        generate.PROTOS_DIR / generate.SOURCE_SUBDIR,
        tmp_path / generate.SOURCE_SUBDIR,
        ignore=shutil.ignore_patterns("__pycache__"),
    )
    return tmp_path


# --- generated code is fresh -------------------------------------------------------------------


def test_generated_code_is_fresh() -> None:
    assert generate.stale_files() == [], "run `python -m megascope.protos.generate` and commit the result"


def test_check_command_passes_on_committed_tree() -> None:
    # The entry point people and CI run, not only the function behind it.
    result = subprocess.run(
        [sys.executable, "-m", "megascope.protos.generate", "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_check_fails_when_a_proto_changes(protos_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Proves the freshness test can fail: edit a .proto without regenerating.
    proto = protos_copy / "megascope/v1/telemetry.proto"
    source = proto.read_text()
    proto.write_text(source + "\nmessage ExtraForTheFreshnessTest {\n  int32 extra = 1;\n}\n")
    assert proto.read_text() != source, "the edit did not apply; update this test"

    stale = generate.stale_files(protos_copy)
    assert Path("megascope/v1/telemetry_pb2.py") in stale
    assert Path("megascope/v1/telemetry_pb2.pyi") in stale
    assert generate.main(["--check", "--root", str(protos_copy)]) == 1
    assert "telemetry_pb2.py" in capsys.readouterr().err

    # Regenerating fixes it.
    generate.write(protos_copy)
    assert generate.stale_files(protos_copy) == []


def test_check_flags_leftover_generated_file(protos_copy: Path) -> None:
    # A module whose .proto was deleted must not stay importable unnoticed.
    leftover = protos_copy / "megascope/v1/removed_pb2.py"
    leftover.write_text("# generated from a deleted .proto\n")
    assert Path("megascope/v1/removed_pb2.py") in generate.stale_files(protos_copy)
    generate.write(protos_copy)
    assert not leftover.exists()


# --- round trips -------------------------------------------------------------------------------


def _step_report(rank: int = 3) -> telemetry_pb2.StepReport:
    return telemetry_pb2.StepReport(
        node="node0",
        rank=rank,
        local_rank=1,
        world_size=4,
        step=120,
        loss=2.75,
        lr=3e-4,
        grad_norm=0.9,
        tokens=8192,
        step_seconds=0.5,
        data_wait_seconds=0.01,
        forward_seconds=0.12,
        backward_seconds=0.25,
        comm_wait_seconds=0.04,
        optimizer_seconds=0.05,
        other_seconds=0.03,
        tokens_per_second=16384.0,
        mfu=0.41,
        model_flops=1.2e12,
        gc_pause_seconds=0.002,
        wall_time=1_750_000_000.25,
        restart_count=1,
        collectives_issued=960,
        collectives=[
            telemetry_pb2.CollectiveTiming(
                name="allreduce",
                bucket_index=0,
                bytes=25 << 20,
                start_offset_seconds=0.2,
                duration_seconds=0.06,
                blocked_seconds=0.01,
            ),
            telemetry_pb2.CollectiveTiming(
                name="allreduce",
                bucket_index=1,
                bytes=12 << 20,
                start_offset_seconds=0.3,
                duration_seconds=0.04,
                blocked_seconds=0.03,
            ),
        ],
    )


def test_step_report_round_trip() -> None:
    report = _step_report()
    decoded = telemetry_pb2.StepReport.FromString(report.SerializeToString())
    assert decoded == report
    assert decoded.collectives[1].bytes == 12 << 20
    assert decoded.HasField("mfu") and decoded.mfu == pytest.approx(0.41)
    # Optional fields distinguish "absent" from zero: val_loss was never set.
    assert not decoded.HasField("val_loss")

    decoded.ClearField("mfu")
    decoded.val_loss = 0.0
    again = telemetry_pb2.StepReport.FromString(decoded.SerializeToString())
    assert not again.HasField("mfu")
    assert again.HasField("val_loss") and again.val_loss == 0.0


def test_telemetry_batch_round_trip() -> None:
    batch = telemetry_pb2.Telemetry(
        step_reports=[_step_report(0), _step_report(1)],
        host_samples=[
            telemetry_pb2.HostSample(
                node="node0",
                wall_time=1.5,
                cpu_percent=55.0,
                cpu_percents=[50.0, 60.0],
                memory_used_bytes=8 << 30,
                memory_total_bytes=64 << 30,
                disk_read_bytes_per_second=1e6,
                disk_write_bytes_per_second=2e6,
                net_recv_bytes_per_second=3e6,
                net_sent_bytes_per_second=4e6,
                load_average_1m=3.5,
            )
        ],
        gpu_samples=[
            telemetry_pb2.GpuSample(
                node="node0",
                wall_time=1.5,
                index=0,
                name="NVIDIA H100",
                uuid="GPU-0",
                utilization_percent=97,
                memory_used_bytes=70 << 30,
                memory_total_bytes=80 << 30,
                temperature_celsius=71,
                power_watts=650,
                power_limit_watts=700,
                sm_clock_mhz=1980,
                mem_clock_mhz=2619,
                ecc_errors_corrected=2,
                ecc_errors_uncorrected=0,
                xid_errors=[79],
                throttle_reasons=["sw_power_cap"],
            )
        ],
        events=[
            telemetry_pb2.Event(
                wall_time=2.0,
                node="node0",
                kind="crash",
                severity=telemetry_pb2.Event.SEVERITY_ERROR,
                rank=2,
                step=121,
                text="rank 2 exited with code 1",
                crash=telemetry_pb2.CrashDetail(exit_code=1, pid=77, detect_seconds=0.25, last_step=121),
            )
        ],
        backfill=True,
        node_info=telemetry_pb2.NodeInfo(
            node="node0",
            hostname="host-a",
            agent_address="127.0.0.1:50051",
            pid=4242,
            ranks=[0, 1],
            world_size=4,
            gpu_available=False,
            gpu_status="no GPU: NVML Shared Library Not Found",
            start_wall_time=1.0,
            agent_version="0.1.0",
        ),
    )
    decoded = telemetry_pb2.Telemetry.FromString(batch.SerializeToString())
    assert decoded == batch
    assert decoded.backfill
    assert [r.rank for r in decoded.step_reports] == [0, 1]
    assert list(decoded.host_samples[0].cpu_percents) == [50.0, 60.0]
    assert list(decoded.gpu_samples[0].xid_errors) == [79]
    event = decoded.events[0]
    assert event.severity == telemetry_pb2.Event.SEVERITY_ERROR
    assert event.HasField("rank") and event.rank == 2
    assert event.WhichOneof("detail") == "crash" and event.crash.exit_code == 1 and event.crash.detect_seconds == 0.25
    assert decoded.node_info.gpu_status.startswith("no GPU")

    # The same batch wrapped as the agent streams it.
    response = agent_pb2.WatchResponse(telemetry=batch)
    assert agent_pb2.WatchResponse.FromString(response.SerializeToString()).telemetry == batch


def test_attach_oneofs_round_trip() -> None:
    hello = worker_pb2.AttachRequest(hello=worker_pb2.Hello(rank=1, world_size=2, pid=7, run_id="r"))
    assert worker_pb2.AttachRequest.FromString(hello.SerializeToString()).WhichOneof("payload") == "hello"

    command = worker_pb2.AttachResponse(
        command=worker_pb2.Command(id="c1", kind=worker_pb2.COMMAND_KIND_CHECKPOINT, step=60)
    )
    decoded = worker_pb2.AttachResponse.FromString(command.SerializeToString())
    assert decoded.WhichOneof("payload") == "command"
    assert decoded.command.kind == worker_pb2.COMMAND_KIND_CHECKPOINT
    assert decoded.command.id == "c1" and decoded.command.step == 60

    # The lifecycle messages a worker sends on its stream, each its own payload.
    lifecycle = {
        "finished": worker_pb2.RankFinished(steps=60, param_digest="abc"),
        "failure": worker_pb2.ExitReport(rank=1, pid=7, exit_code=1, log_tail=["RuntimeError: boom"]),
        "self_check": worker_pb2.SelfCheckResult(
            detail=telemetry_pb2.SelfCheckDetail(verdict=telemetry_pb2.SelfCheckDetail.VERDICT_SLOW)
        ),
        "command_ack": worker_pb2.CommandAck(command_id="c1", ok=True, message="will save after step 60"),
    }
    for payload, message in lifecycle.items():
        request = worker_pb2.AttachRequest(**{payload: message})
        decoded_request = worker_pb2.AttachRequest.FromString(request.SerializeToString())
        assert decoded_request.WhichOneof("payload") == payload
        assert getattr(decoded_request, payload) == message


def test_an_events_kind_is_derived_from_its_detail_and_numbers_stay_numbers() -> None:
    hang = telemetry_pb2.HangDetail
    stalled = events.make_event("waiting", hang(verdict=hang.VERDICT_ELSEWHERE, detect_seconds=4.5), wall_time=1.0)
    assert stalled.kind == "stalled" and events.detail_fields(stalled)["detect_seconds"] == 4.5
    culprit = events.make_event("rank 2 hangs", hang(verdict=hang.VERDICT_CULPRIT, culprit_rank=2), rank=2)
    assert culprit.kind == "hang" and culprit.rank == 2 and culprit.wall_time > 0
    restart = telemetry_pb2.RestartDetail
    assert events.make_event("back", restart(phase=restart.PHASE_DONE, steps_lost=2)).kind == "restart"
    assert events.make_event("started", kind=events.AGENT_STARTED).WhichOneof("detail") is None
    with pytest.raises(ValueError, match="needs a kind"):
        events.make_event("no kind, no detail")
    with pytest.raises(TypeError, match="not an Event detail"):
        events.make_event("wrong detail", worker_pb2.RankFinished())


# --- conventions -------------------------------------------------------------------------------


def _all_enums() -> Iterator[EnumDescriptor]:
    def nested(message_types: Iterable[Descriptor]) -> Iterator[EnumDescriptor]:
        for message in message_types:
            yield from message.enum_types
            yield from nested(message.nested_types)

    for file in FILES:
        yield from file.enum_types_by_name.values()
        yield from nested(file.message_types_by_name.values())


def _upper_snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def test_enum_zero_values_are_unspecified() -> None:
    enums = list(_all_enums())
    # Guard against the walk silently finding nothing.
    assert {e.name for e in enums} >= {"Severity", "RankState", "CommandKind"}
    for enum in enums:
        zero = enum.values_by_number[0].name
        assert zero == f"{_upper_snake(enum.name)}_UNSPECIFIED", enum.full_name
    # Unset enum fields read as the zero value.
    assert telemetry_pb2.Event().severity == telemetry_pb2.Event.SEVERITY_UNSPECIFIED
    assert telemetry_pb2.RankStatus().state == telemetry_pb2.RANK_STATE_UNSPECIFIED
    assert worker_pb2.Command().kind == worker_pb2.COMMAND_KIND_UNSPECIFIED


def test_services_follow_buf_standard() -> None:
    services = [s for file in FILES for s in file.services_by_name.values()]
    assert {s.name for s in services} == {"AgentService", "WorkerService"}
    for service in services:
        for method in service.methods:
            assert method.input_type.name == f"{method.name}Request", method.full_name
            assert method.output_type.name == f"{method.name}Response", method.full_name
    for file in FILES:
        assert file.package == "megascope.v1"
