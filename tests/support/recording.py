"""A MODEL clone that records, during real sampling, every model call's sigma and schedule and chosen linears'
inputs and outputs (the K-LoRA sampling tests compare them with the dense rule)."""


def recording_clone(model, modules, key: str = "lorarar_test_recording"):
    """(clone, calls, records, handles): calls gets (sigma, schedule) per model call, records gets
    (call index, module, x, y) per forward of each module in ``modules``; remove the handles afterwards."""
    import comfy.patcher_extension

    calls, records, handles = [], [], []

    def note_sigma(executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs["transformer_options"]
        calls.append((float(t.max()), [float(s) for s in options["sample_sigmas"]]))
        return executor(x, t, *args, **kwargs)

    recording = model.clone()
    recording.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, key, note_sigma)
    for module in modules:
        linear = recording.get_model_object(f"diffusion_model.{module}")
        handles.append(linear.register_forward_hook(lambda _, inputs, output, module=module: records.append(
            (len(calls) - 1, module, inputs[0].detach().clone(), output.detach().clone()))))
    return recording, calls, records, handles
