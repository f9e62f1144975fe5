from setuptools import find_packages, setup

setup(
    name="taskomatic",
    version="0.1.0",
    description="Ordered, crash-safe task executor for libvirt virtualization management",
    license="GPL-2.0-or-later",
    python_requires=">=3.11",
    packages=find_packages(include=["taskomatic", "taskomatic.*"]),
    package_data={"taskomatic.db": ["migrations/*.sql", "sql/*.sql"]},
    install_requires=[
        "psycopg2>=2.8",
        "libvirt-python>=6.0",
        "multiprocess>=0.70",
        "sdnotify>=0.3",
        "setproctitle>=1.2",
        "tqdm>=4.60",
        "prometheus-client>=0.12",
    ],
    extras_require={
        "test": ["pytest>=7", "hypothesis>=6", "ruff", "mypy"],
        "bench": ["matplotlib>=3.5"],
    },
    entry_points={
        "console_scripts": ["taskomatic = taskomatic.cli:main"],
        "taskomatic.actions": [
            "vm = taskomatic.actions.vm:ACTIONS",
        ],
    },
)
