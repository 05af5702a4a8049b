from extensions_lib.install_plan import HOST_PACKAGES, plan_install


def installed(*names):
    return lambda name: name in names


def test_nothing_installed_on_cpu_host_gets_cpu_onnxruntime():
    plan = plan_install(installed(*HOST_PACKAGES), cuda_torch=False)
    assert plan.to_install == ["huggingface_hub", "tqdm", "onnxruntime", "opencv-python-headless"]
    assert not set(plan.to_install) & set(HOST_PACKAGES)


def test_the_webuis_opencv_is_used_never_a_second_one():
    for wheel in ("opencv-python", "opencv-python-headless", "opencv-contrib-python"):
        plan = plan_install(installed(*HOST_PACKAGES, "huggingface_hub", "tqdm", "onnxruntime", wheel), cuda_torch=False)
        assert plan.to_install == []


def test_cuda_host_gets_gpu_onnxruntime_only():
    plan = plan_install(installed(*HOST_PACKAGES, "huggingface_hub", "tqdm", "opencv-python"), cuda_torch=True)
    assert plan.to_install == ["onnxruntime-gpu"]


def test_existing_onnxruntime_is_kept_whatever_the_flavour():
    assert plan_install(installed("huggingface_hub", "tqdm", "onnxruntime", "opencv-python"), cuda_torch=True).to_install == []
    assert plan_install(installed("huggingface_hub", "tqdm", "onnxruntime-gpu", "opencv-python"), cuda_torch=False).to_install == []


def test_both_onnxruntimes_reported_with_fix_and_nothing_added():
    plan = plan_install(installed("huggingface_hub", "tqdm", "onnxruntime", "onnxruntime-gpu", "opencv-python"), cuda_torch=True)
    assert plan.to_install == []
    assert "pip uninstall -y onnxruntime onnxruntime-gpu" in plan.warnings[0]
    assert plan.warnings[0].endswith("pip install onnxruntime-gpu")

