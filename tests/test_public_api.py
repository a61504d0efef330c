import corral
import corral.runtime
import corral.stores


def test_exported_names_are_pinned() -> None:
    assert sorted(corral.__all__) == sorted([
        "Agent", "AgentResult", "Context", "CorralError", "InvalidInput", "Limits",
        "LoopDetected", "NonDeterminismError", "NonRetryable", "OutputInvalid", "ProviderError",
        "RetryPolicy", "RunCancelled", "RunConflict", "RunFailed", "RunFinished", "RunHandle",
        "RunNotFound", "Runtime", "SignalTimeout", "Step", "StepFailed", "StoreError", "Tool",
        "ToolError", "UsageError", "UsageLimitExceeded", "Workflow", "WorkflowNotFound",
        "__version__", "load_workflow", "step", "tool", "workflow",
    ])
    for name in corral.__all__:
        assert hasattr(corral, name), name


def test_errors_share_one_root_and_survive_pickling() -> None:
    import pickle

    err = corral.StepFailed("step 'x' failed", step="x", error_type="ValueError", error="boom",
                            attempts=2)
    copy = pickle.loads(pickle.dumps(err))
    assert isinstance(copy, corral.CorralError)
    assert (copy.step, copy.error_type, copy.attempts, str(copy)) == (
        "x", "ValueError", 2, "step 'x' failed")
    assert issubclass(corral.UsageError, corral.CorralError)
    assert not issubclass(corral.StepFailed, corral.UsageError)


def test_the_observability_surface_is_pinned() -> None:
    import corral.observability as observability

    assert sorted(observability.__all__) == [
        "OTLPExporter", "RunCollector", "Span", "Tracing", "describe_step", "install",
        "run_metrics",
    ]
    for name in observability.__all__:
        assert hasattr(observability, name), name
