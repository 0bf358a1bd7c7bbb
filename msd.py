"""Multi-Student Distillation generator: K one-step students and the label partition as one module.

    MSD(z, y) = G_{k(y)}(z, y),   k(y) = the student that owns class y          (MSD sec. 3.1, Fig. 2)

Each label is routed to its student by a table lookup; the batch is sorted by student, every
student runs once on the contiguous sub-batch of labels it owns, and the images come back in input
order (one host sync per call, to read the sub-batch sizes). One image still costs one network
evaluation (of a student that may be smaller than the teacher).

A checkpoint is one file holding the partition, every student's NetConfig and state_dict, and the
run's config; it loads with torch.load(weights_only=True), so opening it never runs code.
Run: python sample.py --ckpt runs/fashion/msd.pt --grid grid.png
     python msd.py runs/fashion/msd.pt msd-bf16.pt --dtype bfloat16     (a copy with weights stored in bf16)
"""
from dataclasses import asdict

import torch
from torch import nn

import partition as P
from student import Student
from checkpoint import LIMITS, atomic_save, check_weights, net_config_from_dict, one_line_errors, read_checkpoint


class MSD(nn.Module):
    def __init__(self, students, groups, num_classes):
        super().__init__()
        self.groups = P.validate(groups, num_classes)
        if len(students) != len(self.groups):
            raise ValueError(f'{len(students)} students for a partition of {len(self.groups)} groups')
        self.num_classes = num_classes
        self.students = nn.ModuleList(students)
        self.register_buffer('student_of', P.routing_table(self.groups, num_classes), persistent=False)

    def route(self, labels):
        """labels [N] (ints) -> student index [N]."""
        return P.lookup(self.student_of, labels)

    def sizes(self, labels):
        """How many of these labels each student owns (K ints). Checks the labels; one host sync."""
        owner = self.route(labels)
        return (owner[:, None] == torch.arange(len(self.students), device=owner.device)).sum(0).tolist()

    def forward(self, z, labels, sizes=None):
        """One network evaluation per image: x[i] = G_{k(labels[i])}(z[i], labels[i]).

        The batch is sorted by student (a stable sort keeps input order within a student), each
        student runs once on its contiguous slice, and the images are scattered back to input order.
        `sizes` (from self.sizes(labels)) may be given to skip the host sync, e.g. inside a CUDA graph
        captured for one label mix."""
        order, parts = self.split(z, labels, sizes)
        return self.merge(z, order, [G(zk, yk) for G, (zk, yk) in zip(self.students, parts) if len(zk)])

    def split(self, z, labels, sizes=None):
        """The batch sorted by student: (order, [(z_k, y_k) for each student k]), z_k possibly empty."""
        if sizes is None:
            sizes = self.sizes(labels)
        order = self.student_of[labels].argsort(stable=True)
        return order, list(zip(z[order].split(sizes), labels[order].split(sizes)))

    def merge(self, z, order, outputs):
        """The students' outputs (in student order, non-empty sub-batches only) back in input order."""
        out = torch.empty_like(z)
        if outputs:
            out[order] = torch.cat([x.to(z.dtype) for x in outputs])
        return out


def msd_checkpoint(students, groups, num_classes, config: dict, **extra) -> dict:
    """One plain dict: loadable with weights_only=True (tensors, lists, numbers, strings only)."""
    return dict(kind='msd', num_classes=num_classes, partition=[list(g) for g in groups],
                sigma_max=students[0].sigma_max,
                students=[dict(net=asdict(s.net.cfg), state_dict=s.state_dict()) for s in students],
                config=config, **extra)


def load_msd(path, map_location='cpu', num_classes=None) -> MSD:
    """Load an MSD checkpoint; refuses other kinds of file and, if given, another label count. The label
    count, partition and student count are checked before any student is built, and each student's
    weights against its settings (teacher.check_weights), so a small file cannot ask for a large model."""
    ckpt = read_checkpoint(path, 'msd', map_location)
    C, groups, records, sigma_max = (ckpt.get(k) for k in ('num_classes', 'partition', 'students', 'sigma_max'))
    if type(C) is not int or not 1 <= C <= LIMITS['label_dim'][1]:
        raise ValueError(f'{path}: num_classes must be an integer in 1..{LIMITS["label_dim"][1]}')
    if num_classes is not None and C != num_classes:
        raise ValueError(f'{path} was trained for {C} classes, this data has {num_classes}')
    if type(sigma_max) not in (int, float) or not 0 < sigma_max <= 1000:
        raise ValueError(f'{path}: sigma_max must be a number in (0, 1000]')
    try:
        groups = P.validate(groups, C)
    except ValueError as e:
        raise ValueError(f'{path}: {e}') from None
    if not isinstance(records, list) or len(records) != len(groups):
        raise ValueError(f'{path}: the students do not match the partition of {len(groups)} groups')
    students = [load_student(s, sigma_max, C, f'{path}: student {k}') for k, s in enumerate(records)]
    return MSD(students, groups, C).eval().requires_grad_(False)


def load_student(record, sigma_max, num_classes, where) -> Student:
    """A Student from {'net': NetConfig dict, 'state_dict': ...}, checked before it is built."""
    if not isinstance(record, dict):
        raise ValueError(f'{where} is not a dict')
    cfg = net_config_from_dict(record.get('net'), where)
    if cfg.label_dim != num_classes:
        raise ValueError(f'{where} is for {cfg.label_dim} classes, not {num_classes}')
    check_weights(cfg, record.get('state_dict'), where, prefix='net.')
    student = Student(cfg, float(sigma_max))
    student.load_state_dict(record['state_dict'])
    return student


def main(argv=None):
    """python msd.py IN OUT --dtype bfloat16: a checked copy of an MSD checkpoint with its weights stored
    in another float type (half the bytes; the networks still run in float32)."""
    import argparse
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument('src'), ap.add_argument('dst')
    ap.add_argument('--dtype', default='bfloat16', choices=['float32', 'bfloat16', 'float16'])
    args = ap.parse_args(argv)
    with one_line_errors():
        msd, ckpt = load_msd(args.src), read_checkpoint(args.src, 'msd')      # checked first, then cast as read
        for record in ckpt['students']:
            record['state_dict'] = {k: v.to(getattr(torch, args.dtype)) for k, v in record['state_dict'].items()}
        atomic_save(ckpt, args.dst)
    print(f'wrote {args.dst} ({len(msd.students)} students, weights in {args.dtype})')


if __name__ == '__main__':
    main()
