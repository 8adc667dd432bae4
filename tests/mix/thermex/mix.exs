# Test fixture: a mix release that beamup's integration tests upgrade.
# `@VSN@` is replaced by tests/mix/build in its scratch copy, once per
# version; nothing here is meant to be built in place.
defmodule Thermex.MixProject do
  use Mix.Project

  def project do
    [
      app: :thermex,
      version: "@VSN@",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      deps: [],
      # As a new Elixir user writes it: ERTS included, a tarball made.
      releases: [thermex: [include_erts: true, steps: [:assemble, :tar]]]
    ]
  end

  def application do
    [
      extra_applications: [:logger, :sasl],
      mod: {Thermex.Application, []}
    ]
  end
end
