"""tools/throughput.py: the input-pipeline benchmark runs and reports."""
from simclr_jax.tools import throughput


def test_throughput_benchmark_smoke():
  for reference, on_device in ((False, False), (True, False), (False, True)):
    r = throughput.measure_input_throughput(
        32, num_images=4, batch_size=4, seconds=0.3, warmup_batches=1,
        reference=reference, color_on_device=on_device)
    assert r['color_on_device'] == on_device
    assert r['views_per_s'] > 0 and r['views_per_cpu_s'] > 0
    assert r['image_size'] == 32 and r['cores'] >= 1
    assert 'views/s' in throughput.format_result(r)
