"""Esper's growth in other people's training frameworks.

Each integration is a module of its own (`esper.integrations.lightning`: a PyTorch Lightning
callback) that imports its framework when it is itself imported, never before: `import esper`
does not load any of them. The frameworks are optional extras of esper-core
(`pip install 'esper-core[lightning]'`), not dependencies; importing an integration whose
framework is missing raises an ImportError that names the extra to install.
"""
