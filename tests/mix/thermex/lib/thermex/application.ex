defmodule Thermex.Application do
  @moduledoc false
  use Application
  @vsn "@VSN@"

  @impl true
  def start(_type, _args) do
    Thermex.Supervisor.start_link()
  end
end
