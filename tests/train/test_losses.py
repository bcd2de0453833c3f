import math

import pytest
import torch

from atm_ray.train.losses import attention_mse, check_layer_map, hidden_state_mse, mlm_loss, soft_cross_entropy, uniform_layer_map


def test_mlm_loss_only_on_masked_positions():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
    labels = torch.tensor([[0, -100]])
    assert mlm_loss(logits, labels).item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1)))


def test_soft_cross_entropy_by_hand_with_temperature_squared():
    student = torch.tensor([[[1.0, 0.0, 0.0], [5.0, 5.0, 5.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 0.0], [9.0, 0.0, 0.0]]])
    positions = torch.tensor([[1, 0]])
    temperature = 2.0
    p_teacher = torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0)
    log_p_student = torch.log_softmax(torch.tensor([0.5, 0.0, 0.0]), 0)
    expected = -(p_teacher * log_p_student).sum().item() * temperature**2
    assert soft_cross_entropy(student, teacher, positions, temperature).item() == pytest.approx(expected, rel=1e-6)
    # at T = 1 with identical logits the soft CE is the teacher's entropy
    same = soft_cross_entropy(teacher, teacher, torch.tensor([[1, 1]]), 1.0).item()
    entropies = [-(p * p.log()).sum().item() for p in torch.softmax(teacher[0], -1)]
    assert same == pytest.approx(sum(entropies) / 2, rel=1e-6)


def test_soft_cross_entropy_with_no_positions_is_zero_with_a_gradient():
    student = torch.zeros(1, 2, 3, requires_grad=True)
    loss = soft_cross_entropy(student, torch.zeros(1, 2, 3), torch.zeros(1, 2), 2.0)
    loss.backward()
    assert loss.item() == 0.0 and student.grad is not None


@pytest.mark.parametrize(
    "student,teacher,expected",
    [(4, 24, [0, 6, 12, 18, 24]), (6, 12, [0, 2, 4, 6, 8, 10, 12]), (2, 4, [0, 2, 4])],
)
def test_uniform_layer_maps(student, teacher, expected):
    assert uniform_layer_map(student, teacher) == expected
    check_layer_map(expected, student, teacher)


def test_layer_map_errors():
    with pytest.raises(ValueError, match="multiple"):
        uniform_layer_map(5, 12)
    with pytest.raises(ValueError, match="needs 5"):
        check_layer_map([0, 6, 12], 4, 24)
    with pytest.raises(ValueError, match="outside 0..24"):
        check_layer_map([0, 6, 12, 18, 30], 4, 24)


def test_hidden_state_mse_projects_student_width_to_teacher_width():
    torch.manual_seed(0)
    batch, length, student_width, teacher_width = 2, 5, 4, 8
    student_hidden = tuple(torch.randn(batch, length, student_width) for _ in range(3))  # 2 layers
    teacher_hidden = tuple(torch.randn(batch, length, teacher_width) for _ in range(5))  # 4 layers
    projection = torch.nn.Linear(student_width, teacher_width)
    mask = torch.ones(batch, length)
    mask[1, 3:] = 0
    loss = hidden_state_mse(student_hidden, teacher_hidden, projection, [0, 2, 4], mask)
    keep = mask.bool()
    expected = sum(
        torch.nn.functional.mse_loss(projection(student_hidden[m][keep]), teacher_hidden[t][keep]) for m, t in enumerate([0, 2, 4])
    ) / 3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert projection.weight.grad.shape == (teacher_width, student_width)
    # padding does not count: changing a padded position changes nothing
    changed = tuple(state.clone() for state in teacher_hidden)
    changed[2][1, 4] += 100.0
    assert hidden_state_mse(student_hidden, changed, projection, [0, 2, 4], mask).item() == pytest.approx(loss.item())


def test_attention_mse_averages_heads_and_skips_embeddings():
    torch.manual_seed(0)
    student = tuple(torch.softmax(torch.randn(1, 2, 3, 3), -1) for _ in range(2))  # 2 layers, 2 heads
    teacher = tuple(torch.softmax(torch.randn(1, 4, 3, 3), -1) for _ in range(4))  # 4 layers, 4 heads
    mask = torch.ones(1, 3)
    loss = attention_mse(student, teacher, [0, 2, 4], mask)
    expected = (
        torch.nn.functional.mse_loss(student[0].mean(1), teacher[1].mean(1))
        + torch.nn.functional.mse_loss(student[1].mean(1), teacher[3].mean(1))
    ) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_attention_mse_of_a_map_without_layers_is_zero():
    mask = torch.ones(1, 3)
    assert attention_mse((), (), [0], mask).item() == 0.0
